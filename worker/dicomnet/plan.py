"""What to send back and where: the parsed ``--send-results`` (light: no DICOM libraries imported)."""

from __future__ import annotations

from dataclasses import dataclass

from db import outbox
from db.outbox import OutboxPlan
from db.schema import OutboxKind
from worker.settings import Settings


class DestinationError(ValueError):
    pass


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@host:port`` (the form of ``--send-results``)."""
        aet, at, address = text.strip().partition("@")
        host, colon, port = address.rpartition(":")
        if not (
            at and colon and aet and host and port.isdigit() and 0 < int(port) < 65536 and len(aet) <= 16
        ):
            raise DestinationError(f"expected AET@host:port (AE title up to 16 characters), got {text!r}")
        return cls(aet, host.strip("[]"), int(port))


def results_plan(settings: Settings) -> OutboxPlan:
    """What to send for each scored DICOM film, from the settings (nothing without a destination)."""
    if not settings.results_destination:
        return outbox.NO_RESULTS
    destinations = tuple(d.strip() for d in settings.results_destination.split(",") if d.strip())
    for destination in destinations:
        Destination.parse(destination)
    kinds = [OutboxKind.STRUCTURED_REPORT]
    if settings.send_heatmap:
        kinds.append(OutboxKind.SECONDARY_CAPTURE)
    if settings.send_key_object:
        kinds.append(OutboxKind.KEY_OBJECT)
    return OutboxPlan(destinations, tuple(kinds))

