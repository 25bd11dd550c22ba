#!/usr/bin/env bash
# Run every benchmark once, in the order their comparisons need (single_process_floor reads
# results/ppo_throughput.json). Each waits up to QUIET_WAIT seconds for a 1-minute load average < 1
# (the machine is shared), then saves benchmarks/results/<name>.json. ~20 minutes on 2 cores.
#   benchmarks/run_all.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
QUIET_WAIT=${QUIET_WAIT:-600}
for bench in ppo_throughput single_process_floor vs_trl rollout_efficiency weight_sync; do
    echo "=== $bench"
    "$PY" -m "benchmarks.$bench" --quiet-wait "$QUIET_WAIT"
done
