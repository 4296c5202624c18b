"""Watching and judging a chaos run: the database monitor, per-scenario results, the report table.

*lost* = a file on disk at the end without a final row for its current content; *duplicates* =
images with more than one score plus paths registered twice; *recover* = from the end of a fault
until every file dropped before it is final; *kill -> all final* = from each SIGKILL until the work
it interrupted is final (the killed worker's claimed batch, or every file dropped before the kill).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.chaos.feed import Feeder, files_on_disk

FINAL = ("scored", "rejected", "failed", "superseded")


class Monitor(threading.Thread):
    """Polls the database (directly, never through the proxy) and records when each path is final."""

    def __init__(self, url: str, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.url, self.period = url, period
        self.final_at: dict[str, float] = {}
        self.timeline: list[tuple[float, int, int]] = []  # (t, final images, all images)
        self.stop_event = threading.Event()
        self.errors = 0

    def run(self) -> None:
        from sqlalchemy import create_engine, text

        engine = None
        while not self.stop_event.is_set():
            try:
                if engine is None:
                    engine = create_engine(self.url, connect_args=self._connect_args())
                with engine.connect() as connection:
                    rows = connection.execute(
                        text(
                            "SELECT s.path FROM source_files s JOIN images i ON i.id = s.image_id "
                            "WHERE i.status IN ('scored', 'rejected', 'failed')"
                        )
                    ).all()
                    counts = dict(
                        connection.execute(text("SELECT status, count(*) FROM images GROUP BY status")).all()
                    )
                now = time.monotonic()
                for (path,) in rows:
                    self.final_at.setdefault(path, now)
                final = sum(n for status, n in counts.items() if status in FINAL)
                self.timeline.append((now, final, sum(counts.values())))
            except Exception:  # noqa: BLE001 - schema not there yet, SQLite busy, disk full...
                self.errors += 1
            self.stop_event.wait(self.period)
        if engine is not None:
            engine.dispose()

    def _connect_args(self) -> dict:
        return {"timeout": 1} if self.url.startswith("sqlite") else {"connect_timeout": 5}


@dataclass
class Result:
    name: str
    files_in: int = 0
    on_disk: int = 0
    states: Counter = field(default_factory=Counter)
    duplicates: int = 0
    lost: int = 0
    recover_s: list[float] = field(default_factory=list)
    #: Seconds from each SIGKILL until the work it interrupted was final (issue 9: <= 60 s).
    kill_to_final_s: list[float] = field(default_factory=list)
    #: Kills whose interrupted work never became final.
    kills_unfinished: int = 0
    drain_s: float | None = None
    exits: dict[str, int] = field(default_factory=dict)
    faults: int = 0
    rework: int = 0
    timed_out: bool = False
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    lost_detail: list[str] = field(default_factory=list)

    def recover_text(self) -> str:
        return spread(self.recover_s)

    def kill_text(self) -> str:
        shown = spread(self.kill_to_final_s)
        return shown + (f" ({self.kills_unfinished} never final)" if self.kills_unfinished else "")

    def failures(self, kill_target_s: float) -> list[str]:
        """Why this scenario failed: lost or duplicated work, the time limit, a kill not final in time."""
        out = [f"{n} {what}" for n, what in ((self.lost, "lost"), (self.duplicates, "duplicates")) if n]
        if self.timed_out:
            out.append("timed out")
        slow = [s for s in self.kill_to_final_s if s > kill_target_s]
        if slow or self.kills_unfinished:
            out.append(
                f"{len(slow) + self.kills_unfinished} kill(s) not all-final within {kill_target_s:.0f} s"
            )
        return out


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{sum(values) / len(values):.1f} avg / {max(values):.1f} max"


#: A SIGKILL: its moment, and the paths it interrupted (None: every file dropped before it).
Kill = tuple[float, "list[str] | None"]


def evaluate(
    result: Result,
    url: str,
    drop: Path,
    feeder: Feeder,
    monitor: Monitor,
    faults_end: list[float],
    kills: list[Kill] = (),
):
    """Compare what is on disk with the database; fill ``result``."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as connection:
        sources = connection.execute(text("SELECT path, image_id FROM source_files")).all()
        images = {
            row[0]: row[1:]
            for row in connection.execute(
                text("SELECT id, sha256, status, reason, attempts FROM images")
            ).all()
        }
        scores_per_image = connection.execute(
            text("SELECT image_id, count(*) FROM scores GROUP BY image_id HAVING count(*) > 1")
        ).all()
        paths_twice = connection.execute(
            text("SELECT path, count(*) FROM source_files GROUP BY path HAVING count(*) > 1")
        ).all()
    engine.dispose()
    by_path = {path: image_id for path, image_id in sources}
    disk = files_on_disk(drop)
    result.files_in = len(feeder.dropped)
    result.on_disk = len(disk)
    result.duplicates = len(scores_per_image) + len(paths_twice)
    for path, digest in disk.items():
        image = images.get(by_path.get(path))
        if image is None:
            result.lost += 1
            result.lost_detail.append(f"{Path(path).name}: no row")
            continue
        sha, status, reason, _ = image
        if sha != digest:
            result.lost += 1
            result.lost_detail.append(f"{Path(path).name}: row holds other content ({status})")
            continue
        result.states[status] += 1
        if status not in FINAL:
            result.lost += 1
            result.lost_detail.append(f"{Path(path).name}: {status}")
        elif status == "failed":
            result.notes.append(f"failed: {reason}")
    unfinished = sum(1 for _, status, _, _ in images.values() if status not in FINAL)
    if unfinished:
        result.notes.append(f"{unfinished} image(s) in the database not final")
    claimed = [attempts for _, _, _, attempts in images.values() if attempts]
    result.rework = sum(claimed) - len(claimed)
    # time to recover: end of each fault -> every file dropped before it (and still there) is final
    for fault_end in faults_end:
        before = [p for p, t in feeder.dropped.items() if t <= fault_end and p in disk]
        if not before:
            continue
        done = [monitor.final_at.get(p) for p in before]
        if all(t is not None for t in done):
            result.recover_s.append(max(0.0, max(done) - fault_end))
        else:
            result.notes.append("a fault's backlog never became final")
    for killed_at, interrupted in kills:
        paths = (
            interrupted
            if interrupted is not None
            else [p for p, t in feeder.dropped.items() if t <= killed_at and p in disk]
        )
        done = [monitor.final_at.get(p) for p in paths if p in disk]
        if any(t is None for t in done):
            result.kills_unfinished += 1
        elif done:
            result.kill_to_final_s.append(max(0.0, max(done) - killed_at))
    last_drop = max(feeder.dropped.values(), default=None)
    finals = [monitor.final_at.get(p) for p in disk]
    if last_drop is not None and finals and all(t is not None for t in finals):
        result.drain_s = max(0.0, max(finals) - last_drop)


def wait_all_final(url: str, drop: Path, feeder: Feeder, deadline: float, monitor: Monitor) -> bool:
    """Until every file on disk has a final row with its current content, or the deadline."""
    while time.monotonic() < deadline:
        if feeder.done.is_set():
            from worker.ingest.scanner import is_temporary

            disk_paths = {str(p) for p in drop.rglob("*") if p.is_file() and not is_temporary(p.name)}
            # confirm with content hashes (a replaced file must be final with its new content)
            if disk_paths and disk_paths <= set(monitor.final_at) and _content_final(url, drop):
                return True
        time.sleep(1.0)
    return False


def _content_final(url: str, drop: Path) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT s.path, i.sha256, i.status FROM source_files s JOIN images i ON i.id = s.image_id"
                )
            ).all()
    except Exception:  # noqa: BLE001
        return False
    finally:
        engine.dispose()
    known = {path: (sha, status) for path, sha, status in rows}
    for path, digest in files_on_disk(drop).items():
        sha, status = known.get(path, (None, None))
        if sha != digest or status not in FINAL:
            return False
    return True


def table(results: list[Result]) -> str:
    header = (
        "| scenario | faults | files in | on disk at end | scored | rejected | failed | not final | "
        "duplicates | lost | recover (s) | kill -> all final (s) | drain (s) | unplanned exits | rework | "
        "elapsed (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in results:
        not_final = sum(n for s, n in r.states.items() if s not in FINAL)
        exits = ", ".join(f"{k} {v}" for k, v in r.exits.items()) or "0"
        lines.append(
            f"| {r.name}{' (TIMED OUT)' if r.timed_out else ''} | {r.faults} | {r.files_in} | {r.on_disk} | "
            f"{r.states.get('scored', 0)} | {r.states.get('rejected', 0)} | {r.states.get('failed', 0)} | "
            f"{not_final} | {r.duplicates} | {r.lost} | {r.recover_text()} | {r.kill_text()} | "
            f"{'n/a' if r.drain_s is None else f'{r.drain_s:.1f}'} | {exits} | {r.rework} | "
            f"{r.elapsed_s:.0f} |"
        )
    return header + "\n".join(lines) + "\n"


def notes(results: list[Result]) -> str:
    out = []
    for r in results:
        merged = Counter(r.notes)
        for note, count in merged.items():
            out.append(f"* {r.name}: {note}" + (f" (x{count})" if count > 1 else ""))
        for detail in r.lost_detail[:5]:
            out.append(f"* {r.name}: lost {detail}")
        if len(r.lost_detail) > 5:
            out.append(f"* {r.name}: ... and {len(r.lost_detail) - 5} more lost")
    return "\n".join(out) + "\n"


class Readiness(threading.Thread):
    """Polls the worker's /readyz every 0.2 s from a fault's start until it is 200 again after it."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.started_at = time.monotonic()
        self.answers: list[tuple[float, int]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        import urllib.error
        import urllib.request

        while not self.stop_event.wait(0.2):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as answer:
                    code = answer.status
            except urllib.error.HTTPError as error:
                code = error.code
            except OSError:
                code = 0
            self.answers.append((time.monotonic(), code))

    def note(self, what: str, fault_end: float) -> str:
        """Seconds from the fault to the first 503, and from the end of the fault to the next 200."""
        self.stop_event.set()
        down = next((t - self.started_at for t, code in self.answers if code == 503), None)
        up = next((t - fault_end for t, code in self.answers if t >= fault_end and code == 200), None)
        shown = [f"{x:.1f} s" if x is not None else "never" for x in (down, up)]
        return (
            f"worker /readyz: 503 {shown[0]} after {what} went away, 200 again {shown[1]} after it came back"
        )
