"""The shipping rule for a new pneumonia model, applied to the shift-check reports of the models.

A candidate replaces the shipped model only when all of these hold (the rule of the lung-model
issue; the validation split alone cannot choose, it is saturated and from the training hospital):

1. **No worse on validation**: its Kermany validation ROC AUC is not below the lower end of the
   shipped model's stratified-bootstrap 95 % interval.
2. **Better on other hospitals' films**: higher ROC AUC on all decoded ``external-cxr`` films.
3. **Better on both border probes** (12 % of each side mean grey, and black): a smaller AUC drop
   on the validation films, and a higher AUC on the external films under the probe.
4. **Reads the lungs more**: a higher Grad-CAM share inside the dilated lung fields, on validation
   and on external films.

Input: the JSON reports of ``python -m models.external MODEL --external DIR --data-dir DIR
--attention N --lung-model L --out REPORT.json`` (one per model; the first is the shipped model).

Run: ``python -m models.candidates SHIPPED.json CANDIDATE.json [...] [--names ...]``: a Markdown
table of every model's figures, then each candidate's verdict, check by check.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: The probes of the rule (names as in :data:`models.external.PROBES`).
RULE_PROBES = ("mean_grey_12%", "black_12%")


@dataclass(frozen=True)
class Check:
    """One clause of the rule for one candidate."""

    name: str
    passed: bool
    detail: str


def _validation(report: dict) -> tuple[float, list[float]]:
    probes = report["validation_border_probes"]
    return probes["none"], probes["none_ci95"]


def _external_auc(report: dict) -> float:
    return report["external"]["all_decoded"]["roc_auc"]


def _attention(report: dict, where: str) -> float | None:
    return ((report.get("lung_attention") or {}).get(where) or {}).get("mean_lung_share")


def verdict(shipped: dict, candidate: dict) -> list[Check]:
    """The rule's clauses for ``candidate`` against ``shipped`` (reports as described above)."""
    auc, _ = _validation(candidate)
    shipped_auc, (low, high) = _validation(shipped)
    checks = [
        Check(
            "no worse on validation",
            auc >= low,
            f"AUC {auc:.4f} vs shipped {shipped_auc:.4f} [{low:.4f}-{high:.4f}]",
        ),
        Check(
            "better on external films",
            _external_auc(candidate) > _external_auc(shipped),
            f"AUC {_external_auc(candidate):.3f} vs {_external_auc(shipped):.3f}",
        ),
    ]
    for probe in RULE_PROBES:
        drop = candidate["validation_border_probes"][f"{probe}_drop"]
        shipped_drop = shipped["validation_border_probes"][f"{probe}_drop"]
        ext = candidate["external"]["border_probes"][probe]
        shipped_ext = shipped["external"]["border_probes"][probe]
        checks.append(
            Check(
                f"better under the {probe.replace('_', ' ')} border",
                drop < shipped_drop and ext > shipped_ext,
                f"validation drop {drop:.3f} vs {shipped_drop:.3f}; "
                f"external AUC {ext:.3f} vs {shipped_ext:.3f}",
            )
        )
    for where in ("validation", "external"):
        share, shipped_share = _attention(candidate, where), _attention(shipped, where)
        known = share is not None and shipped_share is not None
        checks.append(
            Check(
                f"reads the lungs more ({where})",
                known and share > shipped_share,
                f"lung share {share:.2f} vs {shipped_share:.2f}" if known else "not measured (--attention)",
            )
        )
    return checks


def _interval(value: float, bounds: list[float], digits: int) -> str:
    return f"{value:.{digits}f} [{bounds[0]:.{digits}f}-{bounds[1]:.{digits}f}]"


def _border(probe: str) -> str:
    """``mean_grey_12%`` -> ``12 % mean grey border``."""
    return f"12 % {probe.split('_1')[0].replace('_', ' ')} border"


def _rows() -> list[tuple[str, Callable[[dict], str]]]:
    """(label, how to read it from a report) for every row of :func:`table`."""
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("validation ROC AUC [95 % CI]", lambda r: _interval(*_validation(r), 4))
    ]
    rows += [
        (f"validation AUC, {_border(p)}", lambda r, p=p: f"{r['validation_border_probes'][p]:.3f}")
        for p in RULE_PROBES
    ]
    rows.append((
        "external AUC, all decoded [95 % CI by patient]",
        lambda r: _interval(_external_auc(r), r["external"]["all_decoded"]["roc_auc_ci95_by_patient"], 3),
    ))
    rows += [
        (f"external AUC, {_border(p)}", lambda r, p=p: f"{r['external']['border_probes'][p]:.3f}")
        for p in RULE_PROBES
    ]
    rows.append((
        "lung-attention share, validation / external",
        lambda r: " / ".join(f"{_attention(r, at) or float('nan'):.2f}" for at in ("validation", "external")),
    ))
    rows.append((
        "external films turned away",
        lambda r: f"{r['external']['turned_away']} of {r['external']['films']}",
    ))
    return rows


def table(names: list[str], reports: list[dict]) -> str:
    """Markdown table: one column per model, one row per figure of the rule."""

    def row(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    lines = [row("figure", names), "|---" * (len(names) + 1) + "|"]
    lines += [row(label, [read(r) for r in reports]) for label, read in _rows()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m models.candidates SHIPPED.json CANDIDATE.json [...] [--names ...]``."""
    parser = argparse.ArgumentParser(prog="python -m models.candidates", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "reports", type=Path, nargs="+", help="shift-check reports; the first is the shipped model"
    )
    parser.add_argument("--names", nargs="+", help="column names (default: the model versions)")
    args = parser.parse_args(argv)
    if len(args.reports) < 2:
        parser.error("give the shipped model's report and at least one candidate's")
    reports = [json.loads(p.read_text()) for p in args.reports]
    names = args.names or [r.get("model_version", p.stem) for r, p in zip(reports, args.reports, strict=True)]
    if len(names) != len(reports):
        parser.error("--names needs one name per report")
    print(table(names, reports))
    for name, report in zip(names[1:], reports[1:], strict=True):
        checks = verdict(reports[0], report)
        print(
            f"\n**{name}**: {'meets the rule' if all(c.passed for c in checks) else 'does not meet the rule'}"
        )
        for check in checks:
            print(f"- {'pass' if check.passed else 'FAIL'}: {check.name} ({check.detail})")


if __name__ == "__main__":
    main()
