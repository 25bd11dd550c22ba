#!/usr/bin/env bash
# The test suite: unit tests (no Ray) and integration tests (local Ray cluster, real vLLM CPU
# engine and DeepSpeed on tiny offline models). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
