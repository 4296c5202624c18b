"""Where the CPU time goes in a real command: py-spy record (all processes of the tree), summarised.

Runs ``py-spy record --subprocesses --format raw`` around the given command (e.g. the real
``cxr-triage scan``), then prints the share of on-CPU samples per process role and the top functions by
inclusive time (any frame) and by self time (leaf frame). Needs py-spy (``.venv/bin/pip install py-spy``).

Run: ``.venv/bin/python bench/profile_run.py --out .work/bench/profile.txt -- .venv/bin/cxr-triage scan DIR ...``
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench import corpus as corpora  # noqa: E402


def py_spy() -> str:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else (shutil.which("py-spy") or "py-spy")


def summarise(raw: Path, top: int = 25, focus: str | None = None) -> str:
    """Summary of a py-spy raw (collapsed stacks) file."""
    inclusive: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    roles: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit() or (focus and focus not in stack):
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        last = max(i for i, f in enumerate(frames) if f.startswith("process ") or i == 0)
        process = frames[last]
        frames = frames[last:]  # the process frame, then Python frames
        if "multiprocessing-fork" in process or "spawn_main" in process:
            role = "pool child (decode/hash)"
        elif "celery" in process:
            role = "celery worker"
        else:
            role = "main process"
        roles[role] += n
        seen = set()
        for frame in frames[1:]:
            name = re.sub(r"\s+\(.*?\)$", "", frame.strip()) + _where(frame)
            if name not in seen:
                inclusive[name] += n
                seen.add(name)
        if len(frames) > 1:
            leaf[re.sub(r"\s+\(.*?\)$", "", frames[-1].strip()) + _where(frames[-1])] += n
        else:
            leaf[f"(no Python frame: native threads) in {role}"] += n
    if not total:
        return "no samples"
    out = [f"{total} samples" + (f" with {focus!r} on the stack" if focus else "")]
    out.append(
        "by process role: " + ", ".join(f"{r} {100 * c / total:.0f} %" for r, c in roles.most_common())
    )
    out.append("\ninclusive (share of all on-CPU samples with this frame on the stack):")
    out += [f"  {100 * c / total:5.1f} %  {name}" for name, c in inclusive.most_common(top)]
    out.append("\nself (leaf frame):")
    out += [f"  {100 * c / total:5.1f} %  {name}" for name, c in leaf.most_common(top)]
    return "\n".join(out)


def _where(frame: str) -> str:
    match = re.search(r"\((.*?):(\d+)\)$", frame.strip())
    if not match:
        return ""
    path = match.group(1)
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f" ({path})"


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__, common_args=False)
    parser.add_argument("--out", default=str(corpora.WORK / "profile.txt"), help="raw py-spy output file")
    parser.add_argument("--rate", type=int, default=50, help="samples per second per process")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--idle", action="store_true", help="also sample idle/waiting threads (wall-clock view)"
    )
    parser.add_argument("--focus", help="only stacks containing this text (e.g. 'Watcher.run')")
    parser.add_argument("--summary-only", action="store_true", help="only summarise an existing --out file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.summary_only:
        command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("a command is required after --")
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = (
            [
                py_spy(),
                "record",
                "--subprocesses",
                "--format",
                "raw",
                "--rate",
                str(args.rate),
                "--output",
                str(out),
            ]
            + (["--idle"] if args.idle else [])
            + ["--"]
        )
        result = subprocess.run(spy + command, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if result.returncode != 0:
            print(f"command exited with {result.returncode}", file=sys.stderr)
    print(summarise(out, args.top, args.focus))


if __name__ == "__main__":
    main()
