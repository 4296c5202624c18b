"""What-if: decode at the resolution the model needs instead of full size (evidence for the analysis).

The model reads a 128 px (or ``input_size``) square, but the product decodes every 2048x2048 film at full
size and then resizes it in floating point. This script times, per format and in one process (one core),
the product's ``worker.prepare.prepare`` against reduced-resolution variants that only use libraries the
product already ships:

* JPEG: Pillow ``draft("L", ...)`` (DCT-domain downscaling by 1/2..1/8 while decoding);
* JPEG 2000 DICOM: the codestream decoded by Pillow's OpenJPEG with ``reduce`` (skips wavelet levels);
* PNG and uncompressed DICOM: full decode (no shortcut), resize with ``reducing_gap=2`` (box pre-reduction).

It also reports how far each variant moves the model input (mean |difference| of the standardised input)
and the score (max |difference| of P(pneumonia) with the model under test), since a product change would
have to keep scores within the container-equivalence tolerance.
Nothing in the product is changed.

Run: ``flock .work/heavy.lock .venv/bin/python bench/bench_decode_variants.py`` (``--quick`` for development).
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, processes, results  # noqa: E402
from bench import corpus as corpora  # noqa: E402
from bench.results import log  # noqa: E402


def _standardised(grey: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    from pipeline.normalise import standardise

    image = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32))
    resized = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0), np.float32)
    return standardise(resized)[..., np.newaxis]


def jpeg_draft(path: str, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image.draft("L", (2 * size, 2 * size))  # keep at least 2x the model input
        grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return _standardised(grey, size)


def j2k_reduced(path: str, size: int) -> np.ndarray:
    import pydicom
    from PIL import Image
    from pydicom.encaps import generate_fragmented_frames

    ds = pydicom.dcmread(path)
    stream = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    side = min(int(ds.Rows), int(ds.Columns))
    levels = 0
    while side // 2 ** (levels + 1) >= 2 * size and levels < 5:
        levels += 1
    with Image.open(io.BytesIO(stream)) as image:
        image.reduce = levels
        image.load()
        grey = np.asarray(image, dtype=np.float32) / float(2 ** int(ds.BitsStored) - 1)
    return _standardised(grey, size)


def full_reducing_gap(path: str, size: int) -> np.ndarray:
    from pipeline.decode import decode_file

    return _standardised(decode_file(path).pixels, size)


VARIANTS = {
    "jpeg": ("Pillow draft (DCT scaling) to >= 2x input", jpeg_draft),
    "dicom-j2k": ("OpenJPEG reduce (skip wavelet levels) to >= 2x input", j2k_reduced),
    "png": ("full decode, resize reducing_gap=2", full_reducing_gap),
    "dicom12": ("full decode, resize reducing_gap=2", full_reducing_gap),
}


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument(
        "--per-format", type=int, default=30, help="files per format (default 30; --quick: 3)"
    )
    parser.add_argument(
        "--files", type=int, default=1200, help="mixed corpus to draw from (default 1200; --quick: 24)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.per_format, args.files = min(args.per_format, 3), min(args.files, 24)

    from pipeline.inference import Scorer
    from worker.prepare import prepare

    model_dir = common.resolve_model_dir(args.model_dir)
    model = results.model_description(model_dir)
    corpus, manifest = corpora.build_corpus("mixed", args.files)
    scorer = Scorer.load(model_dir)
    size = scorer.input_size
    by_format: dict[str, list[str]] = {}
    for entry in manifest["entries"]:
        by_format.setdefault(entry["format"], []).append(str(corpus / entry["path"]))
    if processes.training_running():
        log("WARNING: model training is running: CPU contention, figures will be pessimistic")

    rows = []
    shares = manifest["by_format"]
    current_total = variant_total = 0.0
    for kind, files in sorted(by_format.items()):
        files = files[: args.per_format]
        label, variant = VARIANTS[kind]
        prepare(files[0], size)
        variant(files[0], size)  # warm-up (imports, plugin loading)
        started = time.perf_counter()
        current = [prepare(f, size).tensor for f in files]
        t_current = (time.perf_counter() - started) / len(files)
        started = time.perf_counter()
        changed = [variant(f, size) for f in files]
        t_variant = (time.perf_counter() - started) / len(files)
        a, b = np.stack(current), np.stack(changed)
        pa = np.array([s.pneumonia_probability for s in scorer.score_batch(a)])
        pb = np.array([s.pneumonia_probability for s in scorer.score_batch(b)])
        current_total += t_current * shares[kind]
        variant_total += t_variant * shares[kind]
        rows.append(
            [
                kind,
                len(files),
                f"{1000 * t_current:.0f}",
                label,
                f"{1000 * t_variant:.0f}",
                f"{t_current / t_variant:.1f}x",
                f"{float(np.abs(a - b).mean()):.3f}",
                f"{float(np.abs(pa - pb).max()):.3f}",
            ]
        )
        log(f"  {kind}: {1000 * t_current:.0f} ms -> {1000 * t_variant:.0f} ms")
    n = manifest["files"]
    body = results.table(
        [
            "format",
            "files",
            "prepare now, ms/file (1 core)",
            "variant",
            "variant ms/file",
            "speed-up",
            "mean abs input diff (std units)",
            "max abs P(pneumonia) diff",
        ],
        rows,
    )
    body += (
        f"\n\nCorpus-weighted decode cost per file on one core: now {1000 * current_total / n:.0f} ms, "
        f"with the variants {1000 * variant_total / n:.0f} ms ({current_total / variant_total:.1f}x)."
    )
    notes = [
        f"corpus: {corpora.corpus_description(manifest)}; the first {args.per_format} files of each format",
        "single process, no pool; prepare() here does not hash (as in the limit measurement)",
    ]
    results.publish(
        args,
        "What-if: reduced-resolution decoding (evidence for the throughput analysis)",
        model,
        body,
        notes,
    )


if __name__ == "__main__":
    main()
