"""Inference throughput of a model on ready tensors at batch sizes 1, 8, 32 and 64.

Run: ``python bench/bench_inference.py`` (shipped model) or ``--model-dir DIR``.
Prints images/s per batch size (median of several timed repetitions after a warm-up) and
appends the figures with date, machine and git revision to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root
from bench import results  # noqa: E402

BATCH_SIZES = (1, 8, 32, 64)


def append_results(version: str, size: int, rates: dict[int, float], model_dir) -> str:
    """Append one dated section to bench/RESULTS.md (shared format, see bench/common.py) and return it."""
    body = results.table(
        ["batch size"] + [str(b) for b in BATCH_SIZES],
        [["images/s (median of 5)"] + [f"{rates[b]:.0f}" for b in BATCH_SIZES]],
    )
    return results.append_results(
        "Inference alone on ready tensors",
        results.model_description(Path(model_dir)),
        body,
        [f"input {size} px; Scorer.score_batch on random tensors after 3 warm-up calls"],
    )


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per batch size")
    parser.add_argument("--no-append", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args(argv)
    results.run_started()

    from models import default_model_dir
    from models.compare import inference_rate
    from pipeline.inference import Scorer

    model_dir = args.model_dir or default_model_dir()
    scorer = Scorer.load(model_dir)
    rates = {}
    for batch in BATCH_SIZES:
        rates[batch] = inference_rate(scorer, batch, seconds=args.seconds)
        print(f"batch {batch:>2}: {rates[batch]:8.1f} images/s", flush=True)
    print(f"model {scorer.version}, input {scorer.input_size}, {os.cpu_count()} cores, {results.cpu_model()}")
    if not args.no_append:
        append_results(scorer.version, scorer.input_size, rates, model_dir)
        print(f"appended to {results.RESULTS}")


if __name__ == "__main__":
    main()
