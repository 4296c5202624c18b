"""The model's validated population: which scored films carry an out-of-scope flag.

This is model-card policy, not decoding: a model trained on children aged 1 to 5 years flags
an adult film's score, another model would flag differently. The policy is read from the
model's ``metadata.json`` (key ``validated_population``) by whoever holds the model, and passed
to the code that prepares films::

    "validated_population": {"age_years": [1, 5], "view_position_required": true}

Models whose metadata predates the key were all trained on the Kermany paediatric set, so the
defaults of :class:`ScopePolicy` describe that population.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.types import DicomAttributes

METADATA_KEY = "validated_population"


@dataclass(frozen=True)
class ScopePolicy:
    """Population a model was validated on; films outside it are scored but flagged."""

    #: Youngest and oldest age in whole years; "5 years" includes 5 years 11 months. None: any age.
    age_years: tuple[float, float] | None = (1.0, 5.0)
    #: A film without View Position (PS3.3 C.8.11.5) cannot be shown to be frontal.
    view_position_required: bool = True

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ScopePolicy:
        """The policy stated in a model's metadata, defaults where it says nothing."""
        spec = metadata.get(METADATA_KEY) or {}
        ages = spec.get("age_years", cls.age_years)
        return cls(
            age_years=None if ages is None else (float(ages[0]), float(ages[1])),
            view_position_required=bool(spec.get("view_position_required", cls.view_position_required)),
        )

    def describe(self) -> str:
        """The validated population in words, for the intended-use statement sent with results."""
        parts = ["frontal chest radiographs"]
        if self.age_years is not None:
            low, high = self.age_years
            parts.append(f"of patients aged {low:.0f} to {high:.0f} years")
        return " ".join(parts)

    def out_of_scope_reasons(self, attrs: DicomAttributes) -> list[str]:
        """Why a score for this film falls outside the model's validated population."""
        reasons = []
        age = attrs.patient_age_years
        if self.age_years is not None:
            low, high = self.age_years
            if age is None:
                reasons.append("patient age not recorded")
            elif not low <= age < high + 1:
                reasons.append(
                    f"patient age {age:.1f} years is outside the validated {low:.0f}-{high:.0f} years"
                )
        if self.view_position_required and attrs.view_position is None:
            reasons.append("view position not recorded")
        return reasons
