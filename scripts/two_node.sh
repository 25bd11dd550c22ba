#!/usr/bin/env bash
# A real two-node Ray cluster on one machine: two network namespaces joined by a virtual Ethernet
# link, a Ray head in one and a Ray worker in the other (`ray start`, token authentication on, as
# deploy/ does), and a short PPO job sent with `ray job submit`: rollout, reference and reward on
# the head node, the learner ranks on the worker node, the weights synced across the link.
#
#   sudo scripts/two_node.sh                    # build, run 2 PPO iterations, show where things ran, tear down
#   sudo scripts/two_node.sh -- --ppo.iterations 5   # arguments after -- go to python -m rlhf_ray.launch
#   sudo scripts/two_node.sh up ID DIR          # only build the cluster (tests/integration/netns.py uses these)
#   sudo scripts/two_node.sh exec ID DIR a|b CMD...   # run CMD on node a or b, with the cluster's token
#   sudo scripts/two_node.sh down ID DIR        # stop every process in the namespaces and remove them
#
# Needs root (network namespaces), iproute2 (`ip`, `ss`) and the project's .venv (scripts/bootstrap.sh).
#
# The network: namespaces rr<ID>a (head, 10.77.0.1/24) and rr<ID>b (worker, 10.77.0.2/24), each
# with its own loopback and one end of a veth pair, named rrlink on both sides (interface names are
# per namespace), so one --resources.network_interface rrlink serves every node. Nothing of it is
# reachable from the host's own network: the job is submitted from inside the head's namespace to
# its dashboard on 127.0.0.1:8265, as `ssh -L 8265:127.0.0.1:8265 head` does on real machines.
# Both namespaces see the host's file system, so the model, the run directory and the checkpoints
# are on "shared storage". ID defaults to this shell's pid, so parallel runs do not collide.
#
# Clean-up (on every exit, Ctrl-C included): every process in either namespace is ended by pid
# (`ip netns pids`), then the namespaces (and with them the veth pair) are removed. `ray stop` is
# never used: namespaces share the host's process table, and it would end every Ray process on
# the machine by name, any user's.
#
# Shows: each role's node address and Ray node id (placement.json), the logprob mismatch between
# the learner and vLLM after every sync across the link (metrics.jsonl), the checkpoint files, and
# every listening TCP socket in each namespace while the job ran (`ss -ltnp`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
RAY="$(dirname "$PY")/ray"

ADDR_A=10.77.0.1
ADDR_B=10.77.0.2
IFACE=rrlink

names() {  # ID -> the namespace (and temporary veth end) names and the Ray temp dirs of this cluster
  NS_A="rr${1}a"
  NS_B="rr${1}b"
  TMP_A="/tmp/two_node-${1}a"  # short: Ray's unix socket paths live under it
  TMP_B="/tmp/two_node-${1}b"
}

in_ns() {  # in_ns NAMESPACE DIR COMMAND...: run COMMAND in the namespace with the cluster's environment
  local ns=$1 dir=$2
  shift 2
  ip netns exec "$ns" env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$dir/auth_token" RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$ROOT" PATH="$(dirname "$PY"):$PATH" "$@"
}

up() {  # up ID DIR: namespaces, link, token, Ray head in A and worker in B; DIR/cluster.env says what was made
  local id=$1 dir=$2
  names "$id"
  mkdir -p "$dir"
  ip netns add "$NS_A"
  ip netns add "$NS_B"
  ip link add "$NS_A" type veth peer name "$NS_B"  # temporary names, unique on the host
  local ns addr
  for ns in "$NS_A" "$NS_B"; do
    addr=$ADDR_A
    [ "$ns" = "$NS_B" ] && addr=$ADDR_B
    ip link set "$ns" netns "$ns"
    ip -n "$ns" link set "$ns" name "$IFACE"
    ip -n "$ns" addr add "$addr/24" dev "$IFACE"
    ip -n "$ns" link set "$IFACE" up
    ip -n "$ns" link set lo up
  done
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/auth_token")
  # Small object stores: two nodes on one machine share its memory.
  in_ns "$NS_A" "$dir" "$RAY" start --head --node-ip-address "$ADDR_A" --port 6379 \
    --dashboard-host 127.0.0.1 --dashboard-port 8265 --num-cpus 2 --resources '{"node_a": 4}' \
    --object-store-memory 200000000 --temp-dir "$TMP_A" --disable-usage-stats > "$dir/ray_head.log" 2>&1
  in_ns "$NS_B" "$dir" "$RAY" start --address "$ADDR_A:6379" --node-ip-address "$ADDR_B" \
    --num-cpus 2 --resources '{"node_b": 4}' --object-store-memory 200000000 --temp-dir "$TMP_B" \
    --disable-usage-stats > "$dir/ray_worker.log" 2>&1
  cat > "$dir/cluster.env" << EOF
NS_A=$NS_A
NS_B=$NS_B
ADDR_A=$ADDR_A
ADDR_B=$ADDR_B
IFACE=$IFACE
GCS=$ADDR_A:6379
DASHBOARD=http://127.0.0.1:8265
EOF
  echo "[two_node] head $NS_A ($ADDR_A, Ray temp $TMP_A), worker $NS_B ($ADDR_B, Ray temp $TMP_B), link $IFACE"
}

down() {  # down ID DIR: end every process in both namespaces (by pid), remove them and the link
  local id=$1 dir=${2:-} ns pids
  names "$id"
  for ns in "$NS_A" "$NS_B"; do
    ip netns list | grep -qw "$ns" || continue
    pids=$(ip netns pids "$ns" | tr '\n' ' ')
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill -TERM $pids 2> /dev/null || true
    for _ in $(seq 50); do
      [ -z "$(ip netns pids "$ns")" ] && break
      sleep 0.1
    done
    pids=$(ip netns pids "$ns" | tr '\n' ' ')
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill -KILL $pids 2> /dev/null || true
    ip netns del "$ns" 2> /dev/null || true
  done
  ip link del "$NS_A" 2> /dev/null || true  # a pair made but not yet moved into its namespaces
  rm -rf "$TMP_A" "$TMP_B"
  [ -n "$dir" ] && rm -f "$dir/auth_token"
  echo "[two_node] removed $NS_A and $NS_B and every process in them"
}

listeners() {  # listeners NAMESPACE: every listening TCP socket there, with its process
  ip netns exec "$1" ss -ltnpH | awk '{print "  " $4, $6}'
}

demo() {  # the whole round trip, cleaned up on every exit
  local id=$$ dir
  dir=${TWO_NODE_DIR:-$ROOT/runs/two_node-$(date +%Y%m%d-%H%M%S)}
  dir=$(realpath -m "$dir")
  names "$id"
  # Globals: the trap runs after this function has returned.
  DEMO_ID=$id DEMO_DIR=$dir
  trap 'down "$DEMO_ID" "$DEMO_DIR"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  up "$id" "$dir"
  local run="$dir/run" job="two-node-$id"
  in_ns "$NS_A" "$dir" "$RAY" job submit --address http://127.0.0.1:8265 --submission-id "$job" --no-wait -- \
    "$PY" -m rlhf_ray.launch --config "$ROOT/configs/demo_cpu.yaml" --model.path "$ROOT/artifacts/tiny-llama" \
    --ppo.iterations 2 --rollout.prompts_per_iteration 4 --rollout.samples_per_prompt 4 \
    --ppo.mini_batches 2 --learner.micro_batch_size 2 --rollout.max_new_tokens 8 \
    --rollout.vllm.enforce_eager true --eval.every 0 --checkpoint.every 1 \
    --sync.check_logprobs_every 1 --logging.progress_bar false --logging.log_every 1 \
    --resources.network_interface "$IFACE" --resources.rollout.custom '{node_a: 1}' \
    --resources.reference.custom '{node_a: 1}' --resources.reward.custom '{node_a: 1}' \
    --resources.learner.custom '{node_b: 1}' --logging.run_dir "$run" "$@"
  # While the roles are up (placement.json is written once they are): what listens where.
  for _ in $(seq 600); do
    [ -f "$run/placement.json" ] && break
    in_ns "$NS_A" "$dir" "$RAY" job status --address http://127.0.0.1:8265 "$job" 2> /dev/null \
      | grep -qE "' (failed|was stopped)" && break
    sleep 1
  done
  local snapshot
  snapshot=$(for ns in "$NS_A" "$NS_B"; do echo "$ns:"; listeners "$ns"; done)
  in_ns "$NS_A" "$dir" "$RAY" job logs --address http://127.0.0.1:8265 --follow "$job" || true
  local status
  status=$(in_ns "$NS_A" "$dir" "$RAY" job status --address http://127.0.0.1:8265 "$job" 2> /dev/null \
    | grep -E "Job '|Status for job" | head -1 | sed 's/\x1b\[[0-9;]*m//g; s/.*cli.py:[0-9]* -- //')
  echo
  echo "[two_node] job: $status"
  echo "[two_node] listening TCP sockets while the roles were up (address:port process; * and 0.0.0.0 mean"
  echo "           every address of that namespace, which has only 127.0.0.1 and its $IFACE address):"
  echo "$snapshot"
  if [ -f "$run/summary.json" ]; then
    "$PY" - "$run" << 'PY'
import glob
import json
import os
import sys

run = sys.argv[1]
with open(os.path.join(run, "summary.json")) as fh:
    summary = json.load(fh)
print(f"[two_node] run directory: {summary['run_dir']} (completed: {summary['completed']})")
print("[two_node] placement (role: node address, Ray node id):")
for label, info in summary["placement"].items():
    print(f"  {label}: {info['node_ip']}  {info['node_id']}")
with open(os.path.join(run, "metrics.jsonl")) as fh:
    rows = [json.loads(line) for line in fh]
print("[two_node] logprob mismatch learner vs vLLM after each sync across the link: "
      + ", ".join(f"{r['logprob_mismatch_max']:.2e}" for r in rows))
print("[two_node] checkpoints (learner files written on the worker node, the rest on the head):")
for path in sorted(glob.glob(os.path.join(run, "checkpoints", "iter_*"))):
    print(f"  {path}: {len(glob.glob(os.path.join(path, '**'), recursive=True))} files")
PY
  fi
  case "$status" in *"' succeeded"*) return 0 ;; *) return 1 ;; esac
}

if [ "$(id -u)" != 0 ]; then
  echo "scripts/two_node.sh: network namespaces need root (run it with sudo)" >&2
  exit 2
fi
command -v ip > /dev/null || { echo "scripts/two_node.sh: needs iproute2 (the ip command)" >&2; exit 2; }
case "${1:-}" in
  up) up "$2" "$3" ;;
  down) down "$2" "${3:-}" ;;
  exec)  # exec ID DIR a|b COMMAND...: a command on one node, as the cluster's processes run
    names "$2"
    ns=$NS_A
    [ "$4" = b ] && ns=$NS_B
    dir=$3
    shift 4
    in_ns "$ns" "$dir" "$@" ;;
  --) shift; demo "$@" ;;
  "") demo ;;
  *) echo "usage: $0 [-- launcher args] | up ID DIR | exec ID DIR a|b CMD... | down ID DIR" >&2; exit 2 ;;
esac
