"""Per-format decode cost on one core: the product's reduced-resolution decoders vs full resolution.

The model reads a 128 px (or ``input_size``) square. ``worker.scoring.prepare.prepare`` decodes JPEG 2000 with
OpenJPEG ``reduce`` and JPEG with Pillow ``draft`` (issue 13), and bins grey PNG and DICOM with linear
LUTs (uncompressed 12-bit in the corpus) to >= 4x the input with integer block means before the float
grey-level chain; ``full_resolution_decode=True`` is the path every film took before. This script times both, per format, in one process (one core), as CPU
time of this process (``time.process_time``, less sensitive to other load on a shared machine than the
wall clock, which is reported beside it), and reports how far reduced decoding moves the model input
(mean |difference| of the standardised input) and the score (max |difference| of P(pneumonia)).
Both paths read each file once and hash the bytes they decode, as the product does.

The per-core figures feed the capacity table in README's performance section.

Run: ``.venv/bin/python bench/bench_decode_variants.py`` (``--quick`` for development).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, results  # noqa: E402
from bench import corpus as corpora  # noqa: E402
from bench.results import log  # noqa: E402


def _timed(files: list[str], size: int, full: bool) -> tuple[list, float, float]:
    from worker.scoring.prepare import prepare

    cpu, wall = time.process_time(), time.perf_counter()
    tensors = [prepare(f, size, full_resolution_decode=full).tensor for f in files]
    n = len(files)
    return tensors, (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_size("--per-format", 30, 3, "files per format")
    parser.add_size("--files", 1200, 24, "mixed corpus to draw from")
    args = parser.parse_args(argv)

    from pipeline.dicom import configure_pydicom
    from pipeline.inference import Scorer
    from worker.scoring.allocator import retain_freed_memory
    from worker.scoring.prepare import prepare

    configure_pydicom()
    retain_freed_memory()  # as in every decode process of the product (worker.scoring.decode_pool)
    model_dir, model = common.model_under_test(args)
    corpus, manifest = corpora.build_corpus("mixed", args.files)
    scorer = Scorer.load(model_dir)
    size = scorer.input_size
    by_format: dict[str, list[str]] = {}
    for entry in manifest["entries"]:
        by_format.setdefault(entry["format"], []).append(str(corpus / entry["path"]))

    rows = []
    shares = manifest["by_format"]
    totals = {"full": 0.0, "reduced": 0.0}
    for kind, files in sorted(by_format.items()):
        files = files[: args.per_format]
        prepare(files[0], size)
        prepare(files[0], size, full_resolution_decode=True)  # warm-up (imports, plugin loading)
        full, cpu_full, wall_full = _timed(files, size, True)
        reduced, cpu_reduced, wall_reduced = _timed(files, size, False)
        a, b = np.stack(full), np.stack(reduced)
        pa = np.array([s.pneumonia_probability for s in scorer.score_batch(a)])
        pb = np.array([s.pneumonia_probability for s in scorer.score_batch(b)])
        totals["full"] += cpu_full * shares[kind]
        totals["reduced"] += cpu_reduced * shares[kind]
        rows.append(
            [
                kind,
                len(files),
                f"{1000 * cpu_full:.0f} ({1000 * wall_full:.0f})",
                f"{1000 * cpu_reduced:.0f} ({1000 * wall_reduced:.0f})",
                f"{cpu_full / cpu_reduced:.1f}x",
                f"{float(np.abs(a - b).mean()):.3f}",
                f"{float(np.abs(pa - pb).max()):.4f}",
            ]
        )
        log(f"  {kind}: {1000 * cpu_full:.0f} ms -> {1000 * cpu_reduced:.0f} ms CPU per file")
    n = manifest["files"]
    body = results.table(
        [
            "format",
            "files",
            "full resolution, CPU ms/file (wall)",
            "reduced (product default), CPU ms/file (wall)",
            "speed-up (CPU)",
            "mean abs input diff (std units)",
            "max abs P(pneumonia) diff",
        ],
        rows,
    )
    full_ms, reduced_ms = 1000 * totals["full"] / n, 1000 * totals["reduced"] / n
    body += (
        f"\n\nCorpus-weighted decode cost per file on one core (CPU): full resolution {full_ms:.0f} ms, "
        f"reduced {reduced_ms:.0f} ms ({full_ms / reduced_ms:.1f}x); one core decodes "
        f"{1000 / reduced_ms:.0f} films/s."
    )
    notes = [
        f"corpus: {corpora.corpus_description(manifest)}; the first {args.per_format} files of each format",
        "single process, no pool; prepare() reads each file once and hashes the bytes it decodes",
    ]
    results.publish(
        args, "Decode cost per format on one core: reduced vs full resolution", model, body, notes
    )


if __name__ == "__main__":
    main()
