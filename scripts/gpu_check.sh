#!/usr/bin/env bash
# GPU checks of the learner in one go, for a machine with one CUDA GPU, torch and transformers (Ray and
# vLLM are not needed; the machine may have no internet):
#   1. makes DeepSpeed importable, at the version constraints.txt pins (see "DeepSpeed" below);
#   2. runs the GPU tests: pytest -m gpu tests/gpu (the learner in-process over NCCL, ZeRO-2/3 bf16);
#   3. runs the learner benchmark: python -m benchmarks.learner_gpu --device cuda (0.5b, 1.5b;
#      ZeRO-2, ZeRO-3, plain torch), within what is left of the time budget;
#   4. leaves the logs and the benchmark JSON in "$OUT" (default /tmp/gpu_check_out; at most 8 files).
# Total wall time stays under GPU_CHECK_BUDGET_S (default 470 s, i.e. under 8 minutes).
#
# Usage (repository root):  bash scripts/gpu_check.sh [WHEEL_DIR]     (default: $DS_WHEELS, else .whl)
#   BENCH_ARGS adds benchmark flags (e.g. "--sizes 0.5b --repeats 5"). Afterwards copy
#   $OUT/learner_gpu.json to benchmarks/results/ if the figures are to be kept.
#
# DeepSpeed, the first of: the Python environment's own; the wheels in WHEEL_DIR, installed into a
# private site dir (DS_SITE, default /tmp/ds_site) with DS_BUILD_OPS=0; pip's index, into the same
# dir (deepspeed==<pin> without its dependencies, then pydantic and hjson with theirs; its other
# dependencies, e.g. numpy, psutil, ninja, are in any torch environment). Where none works, the checks
# that need DeepSpeed are skipped and say so: the GPU tests skip (listed by -rs) and the benchmark
# runs plain torch only (--stages torch).
#
# A wheel folder for a machine without internet, made on one with pip and internet (.whl/ is in
# .gitignore; never commit wheels; GPU_PYTHON is the GPU machine's Python, default 3.12):
#   bash scripts/gpu_check.sh --prepare-wheels .whl
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
OUT=${OUT:-/tmp/gpu_check_out}
SITE=${DS_SITE:-/tmp/ds_site}
PY=${PYTHON:-python3}
CONSTRAINTS=$PWD/constraints.txt
pin() { sed -n "s/^$1==\([^[:space:]#]*\).*/\1/p" "$CONSTRAINTS"; }
DS_VERSION=$(pin deepspeed)
if [ -z "$DS_VERSION" ]; then
  echo "[gpu_check] constraints.txt pins no deepspeed version: run from a full checkout of the repository" >&2
  exit 2
fi

if [ "${1:-}" = "--prepare-wheels" ]; then
  dir=${2:?"usage: bash scripts/gpu_check.sh --prepare-wheels DIR"}
  gpu_python=${GPU_PYTHON:-3.12}
  mkdir -p "$dir"
  # deepspeed's sdist builds a pure-Python wheel (no ops); pydantic-core is the one binary wheel.
  $PY -m pip wheel --no-deps -w "$dir" "deepspeed==$DS_VERSION" &&
  $PY -m pip download --only-binary=:all: --python-version "$gpu_python" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -c "$CONSTRAINTS" -d "$dir" pydantic hjson ||
    { echo "[gpu_check] could not prepare the wheels (see pip's message above)" >&2; exit 3; }
  echo "[gpu_check] $(ls "$dir"/*.whl | wc -l) wheels in $dir; then: bash scripts/gpu_check.sh $dir" >&2
  exit 0
fi

WHEELS=${1:-${DS_WHEELS:-.whl}}
mkdir -p "$OUT"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
export DS_BUILD_OPS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
has_deepspeed() { $PY -c "import deepspeed" >/dev/null 2>&1; }

if has_deepspeed; then
  log "deepspeed: the environment's own"
else
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    log "deepspeed: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
      >"$OUT/install.log" 2>&1 || log "pip install from $WHEELS failed (see install.log)"
  else
    log "deepspeed: no wheels in '$WHEELS'; trying pip's index for deepspeed==$DS_VERSION (constraints.txt)"
    { timeout 180 $PY -m pip install -q --retries 0 --timeout 15 --no-compile --no-deps --upgrade --target "$SITE" \
        -c "$CONSTRAINTS" "deepspeed==$DS_VERSION" &&
      timeout 120 $PY -m pip install -q --retries 0 --timeout 15 --no-compile --upgrade --target "$SITE" \
        -c "$CONSTRAINTS" pydantic hjson; } >"$OUT/install.log" 2>&1 || log "pip could not install it (see install.log)"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| transformers', transformers.__version__,
'| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1 | grep -v "^\[20"
} >"$OUT/env.txt"
cat "$OUT/env.txt"
if has_deepspeed; then
  ds=$($PY -c "import deepspeed; print(deepspeed.__version__)" 2>/dev/null | tail -n 1)
  log "deepspeed $ds$([ "$ds" = "$DS_VERSION" ] || echo " (constraints.txt pins $DS_VERSION: figures may differ)")"
  stages_arg=()
else
  log "deepspeed does not import: the GPU tests that need it skip, the benchmark runs plain torch only." \
    "To run them: bash scripts/gpu_check.sh WHEEL_DIR (a folder made by --prepare-wheels, see the top of this script)"
  stages_arg=(--stages torch)
fi

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
    ${stages_arg[@]+"${stages_arg[@]}"} ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
  brc=$?
  grep -v "^\[20" "$OUT/bench.log" | tail -n 30
  log "benchmark exit code $brc (124: timed out)"
fi
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
