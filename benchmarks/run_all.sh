#!/usr/bin/env bash
# Run every benchmark once, in the order their comparisons need (single_process_floor reads
# results/ppo_throughput.json). Each waits up to QUIET_WAIT seconds for a 1-minute load average < 1
# (the machine is shared), then saves benchmarks/results/<name>.json. ~40 minutes on 2 cores.
#   benchmarks/run_all.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
QUIET_WAIT=${QUIET_WAIT:-600}
# The figures must come from committed code: every result records git_commit, and the README quotes
# results files only. ALLOW_DIRTY=1 runs anyway (its results say how many files differed).
dirty=$(git status --porcelain -- . ':(exclude)benchmarks/results')
if [ -n "$dirty" ] && [ "${ALLOW_DIRTY:-0}" != 1 ]; then
    echo "benchmarks/run_all.sh: the tree has uncommitted changes outside benchmarks/results; commit them" >&2
    echo "(or ALLOW_DIRTY=1 to measure them anyway):" >&2
    echo "$dirty" >&2
    exit 2
fi
# TRL, the single-process reference of vs_trl / vs_trl_grpo, from the project's bench extra at the
# verified stack's versions; no TRL, no comparison: stop rather than skip those rows.
"$PY" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[bench]"
"$PY" -c "import trl, trl.experimental.ppo; print('TRL', trl.__version__)"
echo "=== at $(git rev-parse --short HEAD)"
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
async_correction
train_engines
frozen_scaleout
episodes --repeats 5
RUNS
# Rows whose benchmarks compare inside one invocation and take no --quiet-wait.
for bench in packing estimators vs_trl_grpo; do
    echo "=== $bench"
    "$PY" -m "benchmarks.$bench"
done
