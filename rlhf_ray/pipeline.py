"""The whole RLHF recipe in one Ray session: demo data -> SFT -> reward model -> PPO.

    scripts/demo.sh                                                                  # the main job
    python -m rlhf_ray.pipeline --config configs/pipeline_cpu.yaml
    python -m rlhf_ray.pipeline --config configs/pipeline_cpu.yaml --stages "[ppo]"  # reuse the SFT and RM outputs
    python -m rlhf_ray.pipeline --config configs/pipeline_cpu.yaml --dry-run
    scripts/demo.sh --tools                                                          # the tool-use job

Writes the offline demo data for ``demo_task`` unless it is there (``compare``, "which is
larger": ``rlhf_ray.data.compare_task``), fine-tunes the base model on the demonstrations
(``rlhf_ray.train_sft``), trains a Bradley-Terry reward model on the preference pairs, starting
from the SFT model (``rlhf_ray.train_rm``), then runs PPO (``rlhf_ray.coordinator.run``) with the
SFT model as policy and frozen reference and the reward model as scorer. The config has one
section per stage (``sft``, ``rm``, ``ppo``, each the stage's own tree); PPO's model and reward
paths must name the SFT and RM outputs. Each stage's trainer ranks are removed before the next
stage starts, so the stages share one cluster's CPUs.

What the user reads at the end: each stage's one-line result (SFT loss, the RM's held-out
pairwise accuracy, PPO's RM reward and KL), then for ``samples_shown`` held-out prompts the SFT
model's answer beside the final policy's, with RM score and gold verdict (all of them in the
PPO run's ``samples.md``; the gold check is ``ppo.reward.gold``, which the reward model never
sees), and a one-line verdict: held-out gold accuracy and RM reward before -> after, final KL.
``curves.png`` in the PPO run directory shows the RM reward with the gold check on one panel and
the KL on another. The summary is also written to ``<ppo run dir>/pipeline_summary.json``.

The tool-use job (``configs/tools_cpu.yaml``, ``demo_task: tools``: "multiply with a calculator",
``rlhf_ray.data.tool_task``) has no reward-model stage: demo data -> SFT on noisy tool-use episodes
-> PPO whose rollouts are episodes with the calculator environment (``rollout.env``), scored by a
reward function that checks the final answer (``rlhf_ray.rewards:tool_answer_correct``, also the
gold check). Its verdict adds the held-out tool-call rate (episodes with a ``<calc>`` call) before
-> after.

What it leaves out: hyper-parameter search; stages on separate clusters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

from rlhf_ray.supervised.config import PipelineConfig, validate_pipeline


def preflight(cfg: PipelineConfig) -> None:
    """Demo data, then the data of every stage that will run, before Ray starts and hours are
    spent: a bad RM file should not surface only after SFT."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.demo_data import ensure_demo_data
    from rlhf_ray.supervised.data import load_preference_data
    from rlhf_ray.supervised.run import prepare_model

    if cfg.demo_data_dir:
        ensure_demo_data(cfg.demo_data_dir, seed=cfg.sft.seed, task=cfg.demo_task)
    if "sft" in cfg.stages:
        prepare_model(cfg.sft)
    if "rm" in cfg.stages:
        # Before SFT has run, the RM's start (the SFT output) has the SFT base's tokenizer.
        rm_start = cfg.rm.model.path
        tok_path = cfg.sft.model.path if rm_start == cfg.sft.train.output_dir and "sft" in cfg.stages else rm_start
        load_preference_data(cfg.rm.data, AutoTokenizer.from_pretrained(tok_path), cfg.rm.seed)
    if "ppo" in cfg.stages:
        for flag, path in (("--ppo.data.prompts", cfg.ppo.data.prompts), ("--ppo.eval.prompts", cfg.ppo.eval.prompts)):
            if path and not path.startswith("builtin:") and not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} {path!r} does not exist; point it at the demo data's file "
                                        "or set --demo_data_dir.")


def before_after(ppo: dict, shown: int, has_tool_call: Callable[[str], bool] | None = None) -> dict:
    """What the user reads at the end: the first and last held-out evaluations of the PPO run
    (iteration 0 is the SFT policy) side by side, and the one-line verdict's numbers. With
    ``has_tool_call`` (response text -> bool), also the share of held-out episodes that call the
    tool, before and after."""
    from rlhf_ray.coordinator.gold import evaluations_side_by_side

    ev = ppo.get("eval") or {}
    if not ev:
        return {}
    first, last = ev["first"], ev["last"]
    out = {"first_iteration": first["iteration"], "last_iteration": last["iteration"],
           "temperature": ev.get("temperature"), "responses": int(last.get("eval/samples", 0)),
           "reward": [first.get("eval/reward_mean"), last.get("eval/reward_mean")],
           "gold": [first.get("eval/gold_mean"), last.get("eval/gold_mean")],
           "kl_end": ppo.get("kl_end"), "samples_md": ppo.get("samples"),
           "reward_name": "RM reward" if ppo.get("reward_kind", "model") == "model" else "reward"}
    try:
        rows = evaluations_side_by_side(ppo["run_dir"], first["iteration"], last["iteration"])
        out["rows"] = rows[:shown]
        if has_tool_call is not None and rows:
            out["tool_call_rate"] = [sum(bool(has_tool_call(r[side]["response"])) for r in rows) / len(rows)
                                     for side in ("before", "after")]
    except (OSError, ValueError) as exc:
        out["rows_note"] = str(exc)
    return out


def run_pipeline(cfg: PipelineConfig, ray_address: str | None = None) -> dict:
    """Run the configured stages in one Ray session; returns the summary."""
    from rlhf_ray.coordinator.run import run as run_ppo
    from rlhf_ray.launch import run_dir_for
    from rlhf_ray.runtime.cluster import start_ray
    from rlhf_ray.train_rm import train_rm
    from rlhf_ray.train_sft import train_sft

    t0 = time.perf_counter()
    preflight(cfg)
    start_ray(ray_address)
    notices = None
    if cfg.ppo.logging.filter_warnings:  # the SFT and RM stages' notices; PPO's go to its run directory
        from rlhf_ray.runtime import quiet

        notices = quiet.install(os.path.dirname(os.path.abspath(cfg.sft.train.output_dir)))
    summary: dict = {"stages": list(cfg.stages)}
    seconds: dict[str, float] = {}
    of = f"/{len(cfg.stages)}"
    if "sft" in cfg.stages:
        print(f"\n=== stage 1{of}: supervised fine-tuning ===")
        t = time.perf_counter()
        summary["sft"] = train_sft(cfg.sft, ray_address)
        seconds["sft"] = time.perf_counter() - t
        print(f"stage 1{of} done in {seconds['sft']:.0f} s. " + stage_line("sft", summary["sft"]), flush=True)
    if "rm" in cfg.stages:
        n = cfg.stages.index("rm") + 1
        print(f"\n=== stage {n}{of}: reward model ===")
        t = time.perf_counter()
        summary["rm"] = train_rm(cfg.rm, ray_address)
        seconds["rm"] = time.perf_counter() - t
        print(f"stage {n}{of} done in {seconds['rm']:.0f} s. " + stage_line("rm", summary["rm"]), flush=True)
    if "ppo" in cfg.stages:
        n = cfg.stages.index("ppo") + 1
        print(f"\n=== stage {n}{of}: PPO with the reward {cfg.ppo.reward.kind} ===")
        t = time.perf_counter()
        run_dir = run_dir_for(cfg.ppo)
        ppo = run_ppo(cfg.ppo, run_dir, ray_address=ray_address)
        summary["ppo"] = {**{k: v for k, v in ppo.items() if k != "placement"}, "reward_kind": cfg.ppo.reward.kind}
        seconds["ppo"] = time.perf_counter() - t
        print(f"stage {n}{of} done in {seconds['ppo']:.0f} s. " + stage_line("ppo", summary["ppo"]), flush=True)
        summary["before_after"] = before_after(summary["ppo"], cfg.samples_shown, tool_call_check(cfg.demo_task))
        with open(os.path.join(ppo["run_dir"], "pipeline_summary.json"), "w") as fh:
            json.dump({**summary, "seconds": seconds}, fh, indent=2, default=str)
    summary["seconds"] = {**seconds, "total": time.perf_counter() - t0}
    if notices is not None and notices.summary():
        print(notices.summary().replace("library notice", "SFT/RM library notice"))
    print(format_summary(summary))
    return summary


def tool_call_check(demo_task: str) -> Callable[[str], bool] | None:
    """How the verdict tells an episode that called the tool (response text -> bool), for a demo
    task with a tool; None for the others."""
    if demo_task != "tools":
        return None
    from rlhf_ray.envs.calculator import find_calls

    return lambda text: bool(find_calls(text))


def stage_line(stage: str, x: dict) -> str:
    """One line of a stage's result (printed when the stage ends and again in the summary)."""
    if stage == "sft":
        return (f"SFT: train loss {x['train_loss_first_step']:.3f} (first step) -> {x['train_loss_last_epoch']:.3f} "
                f"(last epoch); held-out loss {x['eval_before'].get('loss', float('nan')):.3f} -> "
                f"{x['eval_after'].get('loss', float('nan')):.3f}")
    if stage == "rm":
        return (f"RM: held-out pairwise accuracy {x['eval_before']['accuracy']:.3f} -> "
                f"{x['eval_after']['accuracy']:.3f} (chance 0.5)")
    name = "RM reward" if x.get("reward_kind", "model") == "model" else "reward"
    return (f"PPO: {name} {x.get('reward_start', float('nan')):.3f} -> {x.get('reward_end', float('nan')):.3f}, "
            f"KL {x.get('kl_start', float('nan')):.3f} -> {x.get('kl_end', float('nan')):.3f} "
            f"(means of first/last 5 of {x.get('iterations', 0)} iterations); run: {x.get('run_dir')}")


def format_summary(s: dict) -> str:
    lines = ["", "=== pipeline summary ==="]
    lines += [stage_line(stage, s[stage]) for stage in ("sft", "rm", "ppo") if stage in s]
    ba = s.get("before_after") or {}
    if ba.get("rows"):
        from rlhf_ray.coordinator.gold import format_rows

        how = "greedy" if not ba.get("temperature") else f"sampled at temperature {ba['temperature']:g}"
        lines.append(f"held-out answers, iteration {ba['first_iteration']} (the SFT model) -> "
                     f"{ba['last_iteration']} (after PPO), {how}:")
        lines += format_rows(ba["rows"], "RM" if s.get("ppo", {}).get("reward_kind", "model") == "model" else "reward")
        if ba.get("samples_md"):
            lines.append(f"  (all of them: {ba['samples_md']})")
    if ba:
        lines.append(verdict(ba))
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()))
    return "\n".join(lines)


def verdict(ba: dict) -> str:
    """The one-line verdict: held-out gold accuracy, tool-call rate (a tool task only) and reward
    before -> after, final KL."""
    def pair(xs: list) -> str:
        return " -> ".join("n/a" if x is None else f"{x:.3f}" for x in xs)

    how = "greedy" if not ba.get("temperature") else f"sampled at temperature {ba['temperature']:g}"
    gold = (f"held-out gold accuracy {pair(ba['gold'])} ({ba.get('responses', 0)} answers, {how}); "
            if ba["gold"][0] is not None else "")
    tools = f"held-out tool-call rate {pair(ba['tool_call_rate'])}; " if ba.get("tool_call_rate") else ""
    kl = "n/a" if ba.get("kl_end") is None else f"{ba['kl_end']:.3f}"
    return f"VERDICT: {gold}{tools}held-out {ba.get('reward_name', 'RM reward')} {pair(ba['reward'])}; final KL {kl}"


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
