#!/bin/bash
# Runs every benchmark, each under the shared heavy-work lock; figures go to bench/RESULTS.md.
# Usage: bash bench/run_all.sh [extra args for every script, e.g. --model-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LOCK=.work/heavy.lock
mkdir -p .work
if pgrep -f "models.train|cxr-triage model train" >/dev/null; then
    echo "WARNING: model training is running: figures will be pessimistic (and say so in RESULTS.md)" >&2
fi
$PY bench/bench_backlog.py --setup-only "$@"   # one-off, cached corpus set-up; not a measurement
for script in bench_throughput bench_latency bench_backlog bench_memory bench_distributed \
              bench_decode_variants bench_inference; do
    echo "== $script" >&2
    flock "$LOCK" "$PY" "bench/$script.py" "$@"
done
