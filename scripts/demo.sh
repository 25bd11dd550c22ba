#!/usr/bin/env bash
# The main job: the whole RLHF recipe on tiny offline models, on an embedded local Ray cluster:
# demo data -> SFT -> reward model (preference pairs) -> PPO against that reward model, judged by a
# gold check the reward model never sees (configs/pipeline_cpu.yaml; ~2 minutes on 2 cores after set-up).
# Extra arguments go to the pipeline (e.g. --ppo.ppo.iterations 50, --stages "[ppo]").
# The one-stage PPO demo ("answer in digits", a reward function): scripts/demo.sh --one-stage
# PPO with LoRA adapters on the SFT model (rank 8, lr 1e-3; its own run name): scripts/demo.sh --lora
#   (add --stages "[ppo]" to reuse the SFT and reward models of an earlier run);
#   --one-stage --lora: the one-stage demo with LoRA (configs/demo_lora_cpu.yaml).
# The tool-use job: scripts/demo.sh --tools (configs/tools_cpu.yaml): demo data -> SFT on noisy calculator episodes ->
#   PPO on multi-turn episodes with a calculator environment and a verifiable reward; held-out accuracy and
#   tool-call rate before -> after. It takes no --one-stage or --lora.
# --one-stage, --lora and --tools may stand anywhere among the arguments (scripts/demo.sh --stages "[ppo]" --lora).
set -euo pipefail
cd "$(dirname "$0")/.."
# .venv's torch is the CPU build (bootstrap.sh): DeepSpeed's accelerator is the CPU, named here so
# the driver and every actor skip the detection warning.
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
scripts/bootstrap.sh
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
one_stage=0 lora=0 tools=0 rest=()
for arg in "$@"; do  # the script's own flags may stand anywhere; every other argument goes to the job, in order
  case "$arg" in
    --one-stage) one_stage=1 ;;
    --lora) lora=1 ;;
    --tools) tools=1 ;;
    *) rest+=("$arg") ;;
  esac
done
set -- ${rest[@]+"${rest[@]}"}
if [ "$tools" = 1 ]; then
  if [ "$one_stage" = 1 ] || [ "$lora" = 1 ]; then
    echo "demo.sh: --tools is its own job (configs/tools_cpu.yaml) and takes no --one-stage or --lora; drop them." >&2
    exit 2
  fi
  exec .venv/bin/python -m rlhf_ray.pipeline --config configs/tools_cpu.yaml "$@"
fi
if [ "$one_stage" = 1 ]; then
  config=configs/demo_cpu.yaml
  if [ "$lora" = 1 ]; then config=configs/demo_lora_cpu.yaml; fi
  exec .venv/bin/python -m rlhf_ray.launch --config "$config" "$@"
fi
if [ "$lora" = 1 ]; then
  set -- --ppo.name pipeline_ppo_lora --ppo.model.lora.rank 8 --ppo.learner.lr 0.001 "$@"
fi
exec .venv/bin/python -m rlhf_ray.pipeline --config configs/pipeline_cpu.yaml "$@"
