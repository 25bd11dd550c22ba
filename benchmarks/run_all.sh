#!/usr/bin/env bash
# Run every benchmark once, in the order their comparisons need (single_process_floor reads
# results/ppo_throughput.json). Each waits up to QUIET_WAIT seconds for a 1-minute load average < 1
# (the machine is shared), then saves benchmarks/results/<name>.json. ~30 minutes on 2 cores.
#   benchmarks/run_all.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
QUIET_WAIT=${QUIET_WAIT:-600}
# The README table's rows, with the arguments it quotes.
while read -r bench args; do
    echo "=== $bench $args"
    # shellcheck disable=SC2086
    "$PY" -m "benchmarks.$bench" --quiet-wait "$QUIET_WAIT" $args
done <<'RUNS'
ppo_throughput
ppo_throughput --set rollout.async_generation=true --name ppo_throughput_async
single_process_floor
vs_trl --also-shared --also-async
rollout_efficiency --repeats 21
weight_sync
RUNS
# Rows whose benchmarks compare inside one invocation and take no --quiet-wait.
for bench in packing estimators vs_trl_grpo; do
    echo "=== $bench"
    "$PY" -m "benchmarks.$bench"
done
