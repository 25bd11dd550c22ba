"""Our system vs TRL 1.12.0's PPOTrainer: samples/s and the reward curve, same model, same batch.

What it measures, in one invocation:
  * ours: the real roles on a local Ray cluster (one vLLM engine, reference, reward function,
    two DeepSpeed ZeRO-2 learner ranks, gloo weight sync), ``PPOCoordinator.step`` for
    ``--iters`` iterations of 8 prompts x 8 samples x up to 32 new tokens;
  * TRL: ``trl.experimental.ppo.PPOTrainer`` (TRL 1.12.0, the last release that has it) in this
    process, ``--iters`` updates of 64 prompts x 1 sample x up to 32 new tokens (TRL samples one
    response per prompt), HF ``generate`` sampling;
  * both: same tiny Llama (~200k parameters), same reward (``rlhf_ray.rewards.digit_fraction``),
    1 PPO epoch x 2 mini-batches (one optimiser step each), AdamW lr 5e-4 betas (0.9, 0.95),
    constant lr, temperature 1, stop at EOS, k1 KL penalty in the reward with a FIXED coefficient
    0.05, GAE gamma 1 / lambda 0.95, clip 0.2, value clip 0.2, vf_coef 0.1, advantage whitening,
    no gradient clipping (TRL's PPO loop never clips), zero-initialised value head, and a
    separate critic body (TRL's PPO always has one; ours via ``model.separate_critic``;
    ``--also-shared`` adds our default shared-body run).
Reported: seconds per iteration and samples/s after ``--warmup`` iterations (mean), their ratio,
actual response tokens, and both reward curves (mean score per iteration) side by side.
TRL runs twice by default (``--trl-runs 2``), once before ours and once after, and the ratios
use its pooled rate (timed samples / timed seconds over both): this VM's speed drifts by tens of
percent within minutes, and a drift during the run then weighs on both sides alike. Each run
also records the share of CPU time the hypervisor stole ("CPU steal", /proc/stat), which shows
when a run was slowed from outside.

How TRL gets a reward function: TRL 1.12's PPO only takes a reward *model*; its ``get_reward``
runs ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=...,
output_hidden_states=True, ...)`` and reads ``model.score(hidden_states[-1])`` at each row's last
non-pad token. ``DigitFractionRewardModel`` below is such a module: its "backbone" finds each
row's prompt (rows are left-padded prompt + response; the prompt is looked up among the
dataset's tokenised prompts), decodes the response (special tokens skipped, as our reward role
does), scores it with digit_fraction, and returns the score at every position; ``score`` is
the identity. So both systems score exactly the same function of the response text.

What it leaves out: start-up of either system (Ray, roles, the trainer's construction), and
checkpoints. Differences that remain: batch shape (8x8 vs 64x1 prompts x samples), the
generator (vLLM vs HF generate), TRL's per-micro-batch masked-mean losses vs our token-sum over
the step (identical here: one micro-batch per mini-batch), random streams. One seed each: the
reward curves are single runs, not means.

Threads: our roles 1 thread each (demo config), our driver 1; TRL ``--trl-threads`` (default 1:
in checks here 2 threads were ~8% faster at load average ~3 but 20x slower at load ~10, the
OpenMP oversubscription FEASIBILITY.md describes). Ray is shut down before TRL runs.

Run (repository root, ~7 minutes on 2 cores; needs `pip install --no-deps trl==1.12.0`):
    .venv/bin/python -m benchmarks.vs_trl
    .venv/bin/python -m benchmarks.vs_trl --iters 100 --also-shared
"""

from __future__ import annotations

import argparse
import tempfile
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from benchmarks import _env

PROMPTS, SAMPLES = 8, 8
SHARED = dict(lr=5e-4, kl_coef=0.05, epochs=1, mini_batches=2, clip=0.2, value_clip=0.2, vf_coef=0.1,
              gamma=1.0, lam=0.95, temperature=1.0, adam_betas=(0.9, 0.95), seed=0)


# --------------------------------------------------------------------------- ours


def run_ours(model: str, args, separate_critic: bool, async_generation: bool = False) -> dict[str, Any]:
    from benchmarks.ppo_throughput import coordinator_steps

    s = SHARED
    cfg = _env.bench_config(model, **{
        "seed": s["seed"], "rollout.prompts_per_iteration": PROMPTS, "rollout.samples_per_prompt": SAMPLES,
        "rollout.max_new_tokens": args.tokens, "rollout.temperature": s["temperature"],
        "ppo.epochs": s["epochs"], "ppo.mini_batches": s["mini_batches"], "ppo.clip_ratio": s["clip"],
        "ppo.value_clip": s["value_clip"], "ppo.vf_coef": s["vf_coef"], "ppo.gamma": s["gamma"],
        "ppo.lam": s["lam"], "ppo.kl_coef": s["kl_coef"], "ppo.kl_target": "none", "ppo.kl_estimator": "k1",
        "learner.lr": s["lr"], "learner.adam_betas": list(s["adam_betas"]), "learner.max_grad_norm": 0.0,
        "learner.num_ranks": 2, "learner.zero_stage": 2, "learner.micro_batch_size": 16,
        "model.separate_critic": separate_critic, "model.value_head_init_std": 0.0,
        "rollout.async_generation": async_generation,
    })
    rows = coordinator_steps(cfg, args.iters)
    timed = rows[args.warmup:]
    it = _env.mean([r["time/iteration"] for r in timed])
    return {
        "system": ("rlhf_ray (separate critic)" if separate_critic else "rlhf_ray (shared body)")
        + (", async generation (one step off-policy)" if async_generation else ""),
        "seconds_per_iteration": it,
        "samples_per_s": _env.mean([r["samples"] for r in timed]) / it,
        "response_tokens_per_iteration": _env.mean([r["response_tokens"] for r in timed]),
        "reward_curve": [r["reward_mean"] for r in rows],
        "kl_curve": [r["kl_mean"] for r in rows],
        "iteration_seconds": [r["time/iteration"] for r in rows],
    }


# --------------------------------------------------------------------------- TRL


class _ScoreBackbone(nn.Module):
    def __init__(self, owner: "DigitFractionRewardModel") -> None:
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, input_ids, attention_mask=None, position_ids=None, return_dict=True,
                output_hidden_states=True, use_cache=False):
        scores = self._owner[0].score_rows(input_ids, attention_mask)
        hidden = scores[:, None, None].expand(input_ids.shape[0], input_ids.shape[1], 1).contiguous()
        return SimpleNamespace(hidden_states=(hidden,))


class DigitFractionRewardModel(nn.Module):
    """A reward "model" for TRL 1.12 PPO that scores responses with a Python reward function."""

    base_model_prefix = "backbone"

    def __init__(self, tokenizer, prompt_ids: list[list[int]], fn) -> None:
        super().__init__()
        self.tokenizer, self.fn = tokenizer, fn
        self.prompts = {tuple(p) for p in prompt_ids}
        self.lengths = sorted({len(p) for p in prompt_ids}, reverse=True)
        self.backbone = _ScoreBackbone(self)
        self.calls: list[dict[str, float]] = []  # per call: rows, response tokens, mean score

    def _split(self, ids: list[int]) -> tuple[list[int], list[int]]:
        for n in self.lengths:  # the longest dataset prompt that is a prefix of the row
            if tuple(ids[:n]) in self.prompts:
                return ids[:n], ids[n:]
        raise ValueError("a row does not start with any dataset prompt; cannot find its response")

    def score_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        prompts, responses, tokens = [], [], 0
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            first = mask.index(True) if True in mask else len(row)
            p, r = self._split(row[first:])
            r = [t for t, m in zip(r, mask[first + len(p):]) if m]  # drop right padding after the stop token
            tokens += len(r)
            prompts.append(self.tokenizer.decode(p, skip_special_tokens=True))
            responses.append(self.tokenizer.decode(r, skip_special_tokens=True))
        scores = torch.tensor([float(x) for x in self.fn(prompts, responses)], dtype=torch.float32)
        self.calls.append({"rows": len(responses), "response_tokens": tokens, "score_mean": float(scores.mean())})
        return scores

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def run_trl(model: str, args) -> dict[str, Any]:
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf_ray.config import DataConfig
    from rlhf_ray.data.prompts import load_prompt_texts, tokenize_prompts
    from rlhf_ray.rewards import digit_fraction

    s = SHARED
    threads = _env.set_threads(args.trl_threads)
    transformers.set_seed(s["seed"])
    tok = AutoTokenizer.from_pretrained(model)
    data = DataConfig(prompts="builtin:digits", max_prompt_tokens=48)
    prompt_set = tokenize_prompts(load_prompt_texts(data, s["seed"]), tok, data.max_prompt_tokens, data.too_long)
    batch = PROMPTS * SAMPLES
    train = Dataset.from_dict({"input_ids": prompt_set.token_ids})
    evals = Dataset.from_dict({"input_ids": prompt_set.token_ids[:batch]})
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        value.score.weight.zero_()  # zero-initialised value head, like ours (value_head_init_std 0)
    reward = DigitFractionRewardModel(tok, prompt_set.token_ids, digit_fraction)
    out_dir = tempfile.mkdtemp(prefix="trl-ppo-")
    config = PPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=s["seed"],
        # 64 samples per update; 2 mini-batches of 32, each one micro-batch and one optimiser step
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=s["mini_batches"],
        num_ppo_epochs=s["epochs"], local_rollout_forward_batch_size=batch, total_episodes=batch * args.iters,
        response_length=args.tokens, stop_token="eos", temperature=s["temperature"], missing_eos_penalty=None,
        kl_coef=s["kl_coef"], kl_estimator="k1", cliprange=s["clip"], cliprange_value=s["value_clip"],
        vf_coef=s["vf_coef"], gamma=s["gamma"], lam=s["lam"], whiten_rewards=False,
        learning_rate=s["lr"], lr_scheduler_type="constant", adam_beta1=s["adam_betas"][0],
        adam_beta2=s["adam_betas"][1], weight_decay=0.0, num_sample_generations=0,
    )
    clock, stamps, logs_seen = _env.trainer_clock()

    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=train, value_model=value, eval_dataset=evals, callbacks=[clock])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # one printed dict per update is noise here; on_log still sees them
    opt_steps = [0]
    inner_step = trainer.optimizer.optimizer.step if hasattr(trainer.optimizer, "optimizer") else None
    if inner_step is not None:  # count real optimiser steps (accelerate may skip some under accumulation)
        def counted(*a, **k):
            opt_steps[0] += 1
            return inner_step(*a, **k)
        trainer.optimizer.optimizer.step = counted
    trainer.train()
    per_iter = [b - a for a, b in zip(stamps, stamps[1:])]
    timed = per_iter[args.warmup:]
    it = _env.mean(timed)
    scores = [c["score_mean"] for c in reward.calls]
    return {
        "system": "TRL 1.12.0 PPOTrainer (separate critic)",
        "seconds_per_iteration": it,
        "samples_per_s": batch / it,
        "response_tokens_per_iteration": _env.mean([c["response_tokens"] for c in reward.calls[args.warmup:]]),
        "reward_curve": scores,
        "reward_curve_trl_logged": [lg.get("objective/scores") for lg in logs_seen if "objective/scores" in lg],
        "kl_curve": [lg.get("objective/kl") for lg in logs_seen if "objective/kl" in lg],
        "iteration_seconds": per_iter,
        "optimizer_steps_per_iteration": opt_steps[0] / max(len(per_iter), 1) if inner_step else None,
        "threads": threads,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3, help="iterations left out of the timing (not of the curves)")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per response")
    ap.add_argument("--trl-threads", type=int, default=1,
                    help="torch threads for TRL (in checks here 2 threads gave 0.84 vs 0.91 s/it for 1 at load "
                         "average ~3, but 21 s/it at load ~10)")
    ap.add_argument("--also-shared", action="store_true", help="also run our default shared-body actor-critic")
    ap.add_argument("--also-async", action="store_true",
                    help="also run the shared body with rollout.async_generation (one step off-policy)")
    ap.add_argument("--trl-runs", type=int, choices=(1, 2), default=2,
                    help="2: TRL runs once before and once after ours and the ratios use both (the machine "
                         "drifts during the ~6 minutes); 1: once, after ours")
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--name", default="vs_trl")
    args = ap.parse_args()

    _env.set_threads(1)
    quiet = _env.wait_for_quiet(args.quiet_wait)
    model = _env.tiny_model()
    runs, load, trl_errors = [], {"start": _env.loadavg()}, []

    def timed_run(label: str, fn, *a, **k) -> None:
        """One system's run, with the CPU time the hypervisor stole from this VM meanwhile."""
        before = _env.cpu_times()
        try:
            result = fn(*a, **k)
        except Exception as exc:  # TRL only (ours raises): say exactly why, and keep the other numbers
            import traceback

            trl_errors.append(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            print(f"TRL PPO failed: {trl_errors[-1]}", flush=True)
            return
        result.update(label=label, cpu_steal_share=_env.steal_share(before, _env.cpu_times()),
                      loadavg_after=_env.loadavg())
        runs.append(result)

    if args.trl_runs == 2:
        timed_run("TRL (before ours)", run_trl, model, args)
    timed_run("ours", run_ours, model, args, separate_critic=True)
    if args.also_shared:
        timed_run("ours", run_ours, model, args, separate_critic=False)
    if args.also_async:
        timed_run("ours", run_ours, model, args, separate_critic=False, async_generation=True)
    import ray

    ray.shutdown()
    load["after_ours"] = _env.loadavg()
    timed_run("TRL (after ours)", run_trl, model, args)
    load["end"] = _env.loadavg()
    trl_error = "\n".join(trl_errors) or None

    ours = next(r for r in runs if r["label"] == "ours")
    trls = [r for r in runs if r["label"].startswith("TRL")]
    # TRL's pooled rate: all its timed samples over all its timed seconds (drift before/after averages out)
    trl_rate = (sum(r["samples_per_s"] * r["seconds_per_iteration"] for r in trls)
                / sum(r["seconds_per_iteration"] for r in trls)) if trls else float("nan")
    for r in runs:  # TRL's two runs share a system name
        r["name"] = r["system"] + (f" [{r['label']}]" if r["label"] != "ours" else "")
    rows = [{"system": r["name"],
             "s/it": r["seconds_per_iteration"], "samples/s": r["samples_per_s"],
             "resp tokens/it": r["response_tokens_per_iteration"],
             "reward first5": _env.mean(r["reward_curve"][:5]), "reward last5": _env.mean(r["reward_curve"][-5:]),
             "CPU steal": r["cpu_steal_share"], "this / TRL (samples/s)": r["samples_per_s"] / trl_rate}
            for r in runs]
    _env.print_table(rows, title=f"\n{args.iters} iterations of 64 samples x <= {args.tokens} tokens "
                                 f"(timing: mean after {args.warmup} warm-up iterations; TRL = "
                                 f"{trl_rate:.1f} samples/s over its {len(trls)} run(s))")
    curve_rows = [{"iter": i, **{r["name"]: (r["reward_curve"][i] if i < len(r["reward_curve"]) else float("nan"))
                                 for r in runs}} for i in range(args.iters)]
    step = max(1, args.iters // 10)
    shown = curve_rows[::step] + ([curve_rows[-1]] if (args.iters - 1) % step else [])
    _env.print_table(shown,
                     title="\nreward (mean score per iteration), every few iterations")
    key = {"ours_samples_per_s": round(ours["samples_per_s"], 2)}
    if trls:
        key.update(trl_samples_per_s=round(trl_rate, 2), ours_over_trl=round(ours["samples_per_s"] / trl_rate, 3),
                   trl_runs_samples_per_s=[round(r["samples_per_s"], 2) for r in trls])
        for r in runs:
            if r["label"] == "ours" and r is not ours:
                key[f"{r['system']} / TRL"] = round(r["samples_per_s"] / trl_rate, 3)
    _env.save_results(args.name, {"args": vars(args), "settings": SHARED, "batch": {
        "ours": f"{PROMPTS} prompts x {SAMPLES} samples", "trl": f"{PROMPTS * SAMPLES} prompts x 1 sample"},
        "load": {**quiet, **load}, "trl_error": trl_error, "runs": runs,
        "reward_curves_side_by_side": curve_rows}, key)


if __name__ == "__main__":
    main()
