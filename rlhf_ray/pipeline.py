"""The whole RLHF recipe in one Ray session: demo data -> SFT -> reward model -> PPO.

    python -m rlhf_ray.pipeline --config configs/pipeline_cpu.yaml                 # ~3 minutes on 2 CPU cores
    python -m rlhf_ray.pipeline --config configs/pipeline_cpu.yaml --stages "[ppo]"  # reuse the SFT and RM outputs
    python -m rlhf_ray.pipeline --config configs/pipeline_cpu.yaml --dry-run

Writes the offline demo data ("answer in digits") if missing, fine-tunes the base model on it
(``rlhf_ray.train_sft``), trains a Bradley-Terry reward model on preference pairs that favour
digits, starting from the SFT model (``rlhf_ray.train_rm``), then runs PPO
(``rlhf_ray.coordinator.run``) with the SFT model as policy and reference and the reward model as
scorer. The config has one section per stage (``sft``, ``rm``, ``ppo``, each the stage's own
tree); PPO's model and reward paths must name the SFT and RM outputs. Each stage's trainer ranks
are removed before the next stage starts, so the stages share one cluster's CPUs.

The final summary: SFT loss (first step, last epoch, held-out before/after), the RM's held-out
pairwise accuracy, PPO's reward-model score and KL at start and end (means of the first and last
5 iterations) and, for the demo task, the digit fraction of sampled answers from the SFT model
and from the final PPO policy (``digit_check_prompts``). It is printed and written to
``<ppo run dir>/pipeline_summary.json``.

What it leaves out: hyper-parameter search; stages on separate clusters.
"""

from __future__ import annotations

import json
import os
import sys
import time

from rlhf_ray.supervised.config import PipelineConfig, validate_pipeline


def preflight(cfg: PipelineConfig) -> None:
    """Demo data, then the data of every stage that will run, before Ray starts and hours are
    spent: a bad RM file should not surface only after SFT."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.demo_data import ensure_demo_data
    from rlhf_ray.supervised.data import load_preference_data
    from rlhf_ray.supervised.run import prepare_model

    if cfg.demo_data_dir:
        ensure_demo_data(cfg.demo_data_dir, seed=cfg.sft.seed)
    if "sft" in cfg.stages:
        prepare_model(cfg.sft)
    if "rm" in cfg.stages:
        # Before SFT has run, the RM's start (the SFT output) has the SFT base's tokenizer.
        rm_start = cfg.rm.model.path
        tok_path = cfg.sft.model.path if rm_start == cfg.sft.train.output_dir and "sft" in cfg.stages else rm_start
        load_preference_data(cfg.rm.data, AutoTokenizer.from_pretrained(tok_path), cfg.rm.seed)
    if "ppo" in cfg.stages and not os.path.isfile(cfg.ppo.data.prompts) and \
            not cfg.ppo.data.prompts.startswith("builtin:"):
        raise FileNotFoundError(f"--ppo.data.prompts {cfg.ppo.data.prompts!r} does not exist; point it at the demo "
                                "data's prompts.jsonl or set --demo_data_dir.")


def sample_digit_fraction(model_dir: str, prompts: list[str], max_new_tokens: int, seed: int) -> float:
    """Mean digit fraction (the demo task's score) of one sampled answer per prompt (temperature 1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.data.prompts import pad_token_id
    from rlhf_ray.rewards import digit_fraction

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_token_id(tok))
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = digit_fraction(prompts, answers)
    return sum(scores) / len(scores)


def digit_check(cfg: PipelineConfig, run_dir: str) -> dict:
    """Digit fraction of answers sampled from the SFT model and from PPO's final policy."""
    from rlhf_ray.data.prompts import load_prompt_texts
    from rlhf_ray.export import find_policy_dir

    prompts = load_prompt_texts(cfg.ppo.data, cfg.ppo.seed)[: cfg.digit_check_prompts]
    n_new = cfg.ppo.rollout.max_new_tokens
    out = {"prompts": len(prompts),
           "sft": sample_digit_fraction(cfg.sft.train.output_dir, prompts, n_new, cfg.ppo.seed)}
    try:
        out["ppo"] = sample_digit_fraction(find_policy_dir(run_dir), prompts, n_new, cfg.ppo.seed)
    except FileNotFoundError as exc:  # checkpoint.save_on_stop / save_hf_policy turned off
        out["ppo_note"] = str(exc)
    return out


def run_pipeline(cfg: PipelineConfig, ray_address: str | None = None) -> dict:
    """Run the configured stages in one Ray session; returns the summary."""
    from rlhf_ray.coordinator.cluster import start_ray
    from rlhf_ray.coordinator.run import run as run_ppo
    from rlhf_ray.launch import run_dir_for
    from rlhf_ray.train_rm import train_rm
    from rlhf_ray.train_sft import train_sft

    t0 = time.perf_counter()
    preflight(cfg)
    start_ray(ray_address)
    summary: dict = {"stages": list(cfg.stages)}
    seconds: dict[str, float] = {}
    if "sft" in cfg.stages:
        print("\n=== stage 1/3: supervised fine-tuning ===")
        t = time.perf_counter()
        summary["sft"] = train_sft(cfg.sft, ray_address)
        seconds["sft"] = time.perf_counter() - t
    if "rm" in cfg.stages:
        print("\n=== stage 2/3: reward model ===")
        t = time.perf_counter()
        summary["rm"] = train_rm(cfg.rm, ray_address)
        seconds["rm"] = time.perf_counter() - t
    if "ppo" in cfg.stages:
        print("\n=== stage 3/3: PPO with the reward model ===")
        t = time.perf_counter()
        run_dir = run_dir_for(cfg.ppo)
        ppo = run_ppo(cfg.ppo, run_dir, ray_address=ray_address)
        summary["ppo"] = {k: v for k, v in ppo.items() if k != "placement"}
        seconds["ppo"] = time.perf_counter() - t
        if cfg.digit_check_prompts:
            summary["digit_fraction"] = digit_check(cfg, ppo["run_dir"])
        with open(os.path.join(ppo["run_dir"], "pipeline_summary.json"), "w") as fh:
            json.dump({**summary, "seconds": seconds}, fh, indent=2, default=str)
    summary["seconds"] = {**seconds, "total": time.perf_counter() - t0}
    print(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    lines = ["", "=== pipeline summary ==="]
    if "sft" in s:
        x = s["sft"]
        lines.append(f"SFT: train loss {x['train_loss_first_step']:.3f} (first step) -> {x['train_loss_last_epoch']:.3f} "
                     f"(last epoch); held-out loss {x['eval_before'].get('loss', float('nan')):.3f} -> "
                     f"{x['eval_after'].get('loss', float('nan')):.3f}")
    if "rm" in s:
        x = s["rm"]
        lines.append(f"RM: held-out pairwise accuracy {x['eval_before']['accuracy']:.3f} -> "
                     f"{x['eval_after']['accuracy']:.3f} (chance 0.5)")
    if "ppo" in s:
        x = s["ppo"]
        lines.append(f"PPO: RM reward {x.get('reward_start', float('nan')):.3f} -> {x.get('reward_end', float('nan')):.3f}, "
                     f"KL {x.get('kl_start', float('nan')):.3f} -> {x.get('kl_end', float('nan')):.3f} "
                     f"(means of first/last 5 of {x.get('iterations', 0)} iterations); run: {x.get('run_dir')}")
    if "digit_fraction" in s:
        x = s["digit_fraction"]
        lines.append(f"digit fraction of sampled answers ({x['prompts']} prompts): SFT {x['sft']:.3f} -> "
                     f"PPO {x.get('ppo', float('nan')):.3f}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.config import config_to_dict, redacted
    from rlhf_ray.supervised.run import parse_cli

    args, cfg = parse_cli("python -m rlhf_ray.pipeline", "Demo data -> SFT -> reward model -> PPO on one Ray cluster.",
                          PipelineConfig, validate_pipeline, sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        print(json.dumps(redacted(config_to_dict(cfg)), indent=2))
        return 0
    from rlhf_ray.config import ConfigError
    from rlhf_ray.data.records import DataError

    try:
        summary = run_pipeline(cfg, args.ray_address or os.environ.get("RAY_ADDRESS"))
    except (ConfigError, DataError, FileNotFoundError) as exc:  # bad inputs, found before the stage that needs them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if "ppo" not in summary or summary["ppo"].get("completed") else 1


if __name__ == "__main__":
    sys.exit(main())
