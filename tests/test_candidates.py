"""The shipping rule for a new model (models.candidates), on report dicts shaped like the shift check's."""

from __future__ import annotations

import json

from models.candidates import main, verdict


def _report(val: float, ci: tuple, ext: float, drop: float, probe_ext: float, share: float) -> dict:
    probes = {"none": val, "none_ci95": list(ci)}
    for name in ("mean_grey_12%", "black_12%"):
        probes[name], probes[f"{name}_drop"] = val - drop, drop
    return {
        "model_version": "m",
        "validation_border_probes": probes,
        "external": {
            "films": 584,
            "turned_away": 5,
            "all_decoded": {"roc_auc": ext, "roc_auc_ci95_by_patient": [ext - 0.1, ext + 0.1]},
            "border_probes": {"mean_grey_12%": probe_ext, "black_12%": probe_ext},
        },
        "lung_attention": {"validation": {"mean_lung_share": share}, "external": {"mean_lung_share": share}},
    }


SHIPPED = _report(0.9993, (0.9986, 0.9999), 0.675, 0.05, 0.62, 0.53)


def test_a_candidate_better_everywhere_and_within_the_validation_interval_meets_the_rule():
    checks = verdict(SHIPPED, _report(0.9988, (0.998, 0.9995), 0.80, 0.002, 0.79, 0.8))
    assert all(c.passed for c in checks) and len(checks) == 6


def test_a_candidate_below_the_shipped_interval_fails_on_validation_only():
    checks = verdict(SHIPPED, _report(0.9916, (0.987, 0.995), 0.80, 0.002, 0.79, 0.8))
    assert [c.name for c in checks if not c.passed] == ["no worse on validation"]


def test_a_candidate_that_collapses_under_a_border_or_reads_the_edges_fails():
    worse = _report(0.9990, (0.998, 0.9995), 0.80, 0.06, 0.60, 0.4)
    failed = {c.name for c in verdict(SHIPPED, worse) if not c.passed}
    assert failed == {
        "better under the mean grey 12% border",
        "better under the black 12% border",
        "reads the lungs more (validation)",
        "reads the lungs more (external)",
    }


def test_the_command_prints_the_table_and_each_verdict(tmp_path, capsys):
    paths = []
    crop = _report(0.9916, (0.987, 0.995), 0.8, 0.0, 0.79, 0.8)
    for name, report in (("shipped", SHIPPED), ("crop", crop)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    main([str(p) for p in paths] + ["--names", "shipped", "crop"])
    out = capsys.readouterr().out
    assert "| validation ROC AUC [95 % CI] | 0.9993 [0.9986-0.9999] | 0.9916 [0.9870-0.9950] |" in out
    assert "**crop**: does not meet the rule" in out and "- FAIL: no worse on validation" in out
