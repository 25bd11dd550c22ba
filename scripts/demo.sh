#!/usr/bin/env bash
# The main job: distributed PPO on tiny offline models, on an embedded local Ray cluster.
# Extra arguments are passed to the launcher (e.g. --ppo.iterations 50).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
exec .venv/bin/python -m rlhf_ray.launch --config configs/demo_cpu.yaml "$@"
