"""Time-budgeted mutation fuzzing of ``pipeline.decode.decode_file``.

    python -m bench.chaos.fuzz [--seconds 300] [--seed 1]

atheris is not installable here (no wheel in the package index this machine uses), so this is a
plain random mutation fuzzer: seeds are real films (Kermany JPEGs re-encoded as JPEG, 8- and
16-bit PNG, and DICOM built from the same pixels, uncompressed, RLE and JPEG 2000; plus small
files from ../shared/data/dicom), mutated by bit flips, byte sets, interesting 16/32-bit values,
cuts, inserts, deletes and splices. Each input is decoded in a child process with a time limit,
so crashes (the child dies) and hangs are caught and the input is saved under
.work/chaos/fuzz/findings/. Expected outcomes are a decoded image or an ImageProblem
(failed/rejected with a reason); anything else is a finding.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import resource
import struct
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / ".work" / "chaos" / "fuzz"
SHARED = Path(os.environ.get("CXR_TRIAGE_SHARED", REPO.parent / "shared")) / "data"
PER_INPUT_TIMEOUT_S = 20.0
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFF0]


def build_seeds(limit_shared: int = 12) -> list[tuple[str, bytes]]:
    import numpy as np
    from PIL import Image
    from pydicom.uid import JPEG2000Lossless, RLELossless

    sys.path.insert(0, str(REPO))
    from tests.dicom_factory import radiograph

    WORK.mkdir(parents=True, exist_ok=True)
    seeds: list[tuple[str, bytes]] = []
    films = sorted((SHARED / "kermany-cxr224" / "train" / "PNEUMONIA").glob("*.jpeg"))[:2]
    for index, path in enumerate(films):
        grey = np.asarray(Image.open(path).convert("L").resize((256, 256)))
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format="JPEG", quality=85)
        seeds.append((f"jpeg{index}", buffer.getvalue()))
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format="PNG")
        seeds.append((f"png8_{index}", buffer.getvalue()))
        buffer = io.BytesIO()
        Image.fromarray(grey.astype(np.uint16) * 257).save(buffer, format="PNG")
        seeds.append((f"png16_{index}", buffer.getvalue()))
        for syntax_name, syntax in (("raw", None), ("rle", RLELossless), ("j2k", JPEG2000Lossless)):
            target = WORK / f"seed_{syntax_name}_{index}.dcm"
            kwargs = {} if syntax is None else {"syntax": syntax}
            radiograph(grey.astype(np.uint16) * 16, target, **kwargs)
            seeds.append((f"dicom_{syntax_name}{index}", target.read_bytes()))
    shared = sorted(p for p in (SHARED / "dicom").rglob("*") if p.is_file() and p.stat().st_size < 300_000)
    for path in shared[:: max(len(shared) // limit_shared, 1)][:limit_shared]:
        seeds.append((f"shared:{path.name}", path.read_bytes()))
    return seeds


def mutate(rng: random.Random, data: bytes, seeds: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 10)):
        if not out:
            out = bytearray(rng.choice(seeds)[1][:64])
        op = rng.randrange(8)
        pos = rng.randrange(len(out))
        if op == 0:
            out[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[pos] = rng.randrange(256)
        elif op == 2 and len(out) >= 4:
            pos = min(pos, len(out) - 4)
            value = rng.choice(INTERESTING)
            out[pos : pos + 4] = struct.pack(rng.choice("<>") + "I", value & 0xFFFFFFFF)
        elif op == 3 and len(out) >= 2:
            pos = min(pos, len(out) - 2)
            out[pos : pos + 2] = struct.pack(rng.choice("<>") + "H", rng.choice(INTERESTING) & 0xFFFF)
        elif op == 4:
            del out[pos:]
        elif op == 5:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif op == 6:
            del out[pos : pos + rng.randint(1, 256)]
        else:
            other = rng.choice(seeds)[1]
            start = rng.randrange(len(other))
            out[pos : pos + rng.randint(1, 512)] = other[start : start + rng.randint(1, 512)]
    return bytes(out)


def _child(inbox, outbox, scratch: str) -> None:
    """Decode inputs from ``inbox``; report (outcome, detail, seconds) for each."""
    sys.path.insert(0, str(REPO))
    from pipeline.decode import decode_file
    from pipeline.errors import ImageProblem

    path = os.path.join(scratch, f"input-{os.getpid()}")
    while True:
        data = inbox.get()
        if data is None:
            return
        with open(path, "wb") as handle:
            handle.write(data)
        started = time.monotonic()
        try:
            decoded = decode_file(path)
            pixels = decoded.pixels
            ok = pixels.ndim == 2 and str(pixels.dtype) == "float32" and bool((pixels == pixels).all())
            outcome, detail = ("decoded", "") if ok else ("bad-output", f"{pixels.shape} {pixels.dtype}")
        except ImageProblem as problem:
            outcome, detail = problem.status, problem.reason.split(":")[0][:60]
        except Exception as exc:  # noqa: BLE001 - that is what we are looking for
            outcome, detail = "unexpected-exception", f"{type(exc).__name__}: {str(exc)[:120]}"
        outbox.put((outcome, detail, time.monotonic() - started))


class Runner:
    def __init__(self) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.scratch = str(WORK)
        self._start()

    def _start(self) -> None:
        self.inbox, self.outbox = self.context.Queue(), self.context.Queue()
        self.process = self.context.Process(
            target=_child, args=(self.inbox, self.outbox, self.scratch), daemon=True
        )
        self.process.start()

    def run(self, data: bytes) -> tuple[str, str, float]:
        self.inbox.put(data)
        started = time.monotonic()
        while True:
            try:
                return self.outbox.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty
                pass
            if not self.process.is_alive():
                code = self.process.exitcode
                self._start()
                return "crash", f"decoder process died (exit {code})", time.monotonic() - started
            if time.monotonic() - started > PER_INPUT_TIMEOUT_S:
                self.process.kill()
                self.process.join()
                self._start()
                return "hang", f"no answer in {PER_INPUT_TIMEOUT_S:.0f} s", time.monotonic() - started

    def close(self) -> None:
        self.inbox.put(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description="Mutation fuzzing of decode_file.")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seeds = build_seeds()
    findings = WORK / "findings"
    findings.mkdir(parents=True, exist_ok=True)
    runner = Runner()
    outcomes: Counter = Counter()
    reasons: Counter = Counter()
    unexpected: Counter = Counter()
    slowest = (0.0, "")
    started = time.monotonic()
    runs = 0
    try:
        while time.monotonic() - started < args.seconds:
            name, seed = rng.choice(seeds)
            data = mutate(rng, seed, seeds)
            outcome, detail, seconds = runner.run(data)
            runs += 1
            outcomes[outcome] += 1
            if outcome in ("failed", "rejected"):
                reasons[f"{outcome}: {detail}"] += 1
            if seconds > slowest[0]:
                slowest = (seconds, f"{name} -> {outcome}")
            if outcome in ("unexpected-exception", "crash", "hang", "bad-output"):
                unexpected[f"{outcome}: {detail}"] += 1
                (findings / f"{outcome}-{runs:06d}-{name.replace(':', '_')}.bin").write_bytes(data)
    finally:
        runner.close()
    elapsed = time.monotonic() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = {
        "engine": "random mutation (atheris not installable here)",
        "seconds": round(elapsed, 1),
        "inputs": runs,
        "inputs_per_second": round(runs / elapsed, 1) if elapsed else 0,
        "seeds": len(seeds),
        "outcomes": dict(outcomes),
        "findings": dict(unexpected),
        "top_reasons": dict(reasons.most_common(12)),
        "slowest_input_s": round(slowest[0], 2),
        "slowest_input": slowest[1],
        "peak_child_rss_mb": round(peak_mb),
    }
    print(json.dumps(report, indent=2))
    (WORK / "last-fuzz.json").write_text(json.dumps(report, indent=2))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
