#!/usr/bin/env bash
# GPU checks of the learner in one go, for a session lent a GPU machine (one H100 / H200 with torch,
# transformers and NCCL, but no Ray, no vLLM, no DeepSpeed, no internet):
#   1. installs DeepSpeed from a directory of wheels into a private site dir (DS_BUILD_OPS=0);
#   2. runs the GPU tests: pytest -m gpu tests/gpu (the learner in-process over NCCL, ZeRO-2/3 bf16);
#   3. runs the learner benchmark: python -m benchmarks.learner_gpu --device cuda (0.5b, 1.5b;
#      ZeRO-2, ZeRO-3, plain torch), within what is left of the time budget;
#   4. leaves the logs and the benchmark JSON in "$OUT" (at most 8 files, for the device tool).
# Total wall time stays under GPU_CHECK_BUDGET_S (default 470 s, i.e. under 8 minutes).
#
# Usage (repository root):  bash scripts/gpu_check.sh [WHEEL_DIR]     (default: $DS_WHEELS, else .whl)
#   From a session with the device tool: run(command="bash scripts/gpu_check.sh .whl", carry=[".whl"],
#   timeout_s=540). BENCH_ARGS adds benchmark flags (e.g. "--sizes 0.5b --repeats 5"). Afterwards
#   copy $OUT/learner_gpu.json to benchmarks/results/ if the figures are to be kept.
#
# Preparing the wheel directory, once, on a machine with pip and internet (this repo's .venv is
# Python 3.11; the GPU image is 3.12, hence --python-version for the one binary wheel). /.whl/ is
# already in .gitignore; never commit wheels. Versions as measured in /work/shared/FEASIBILITY.md:
#   .venv/bin/python -m pip wheel --no-deps -w .whl deepspeed==0.19.8        # pure-Python wheel
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       typing-extensions==4.16.0 hjson==3.1.0
#   ls .whl    # 7 wheels, about 5 MB; DeepSpeed's other needs (einops, msgpack, ninja, numpy,
#              # packaging, psutil, py-cpuinfo, tqdm, nvidia-ml-py) are in the GPU image.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
WHEELS=${1:-${DS_WHEELS:-.whl}}
OUT=${OUT:-/tmp/gpu_check_out}
SITE=${DS_SITE:-/tmp/ds_site}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  log "no wheels in '$WHEELS': pass the wheel directory (see the comment at the top of this script)"
  exit 2
fi
log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
  >"$OUT/install.log" 2>&1 || { log "pip install failed (see install.log)"; exit 3; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DS_BUILD_OPS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import sys, torch, transformers, deepspeed; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__,
'| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1 | grep -v "^\[20"
} >"$OUT/env.txt"
cat "$OUT/env.txt"
$PY -c "import deepspeed" 2>/dev/null || { log "deepspeed does not import (see env.txt): a wheel is missing"; exit 4; }

log "pytest -m gpu tests/gpu (at most 240 s)"
timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs --junitxml="$OUT/pytest_gpu.xml" \
  >"$OUT/pytest_gpu.log" 2>&1
rc=$?
tail -n 25 "$OUT/pytest_gpu.log"
log "pytest exit code $rc (124: timed out)"

bench_budget=$(( $(left) - 20 ))
if [ "$bench_budget" -lt 60 ]; then
  log "skipping the benchmark: only $(left) s of the budget left"
else
  log "benchmark, budget ${bench_budget} s"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  timeout $(( bench_budget + 15 )) $PY -m benchmarks.learner_gpu --device cuda --repeats 2 \
    --time-budget "$bench_budget" --model-dir /tmp/learner_gpu_models --out "$OUT/learner_gpu.json" \
    ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
  brc=$?
  grep -v "^\[20" "$OUT/bench.log" | tail -n 30
  log "benchmark exit code $brc (124: timed out)"
fi
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
