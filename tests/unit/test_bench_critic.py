"""``benchmarks/critic.py`` without running it: every setting is the main job's PPO section with only
its own keys changed (equal sample budget), the parameter counts follow the checkpoints, the
per-setting spread leaves failed runs out, and the deadline shortens every run alike."""

from __future__ import annotations

import json
import time

import torch
from safetensors.torch import save_file

from benchmarks import critic as bench


def _checkpoint(path, head: str, hidden: int = 4, vocab: int = 10) -> str:
    path.mkdir()
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, hidden), "model.norm.weight": torch.zeros(hidden),
               f"{head}.weight": torch.zeros(vocab if head == "lm_head" else 1, hidden)}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    return str(path)


def test_each_setting_changes_only_its_own_keys(tmp_path):
    base = bench.compare_config(str(tmp_path), "shared", 0, 150)
    assert (base.rollout.prompts_per_iteration, base.rollout.samples_per_prompt) == (16, 4)
    assert base.model.path == str(tmp_path / "sft") and base.reward.model_path == str(tmp_path / "rm")
    for name in bench.SETTINGS:
        cfg = bench.compare_config(str(tmp_path), name, 2, 150)
        assert cfg.seed == 2 and cfg.ppo.iterations == 150
        assert cfg.rollout == base.rollout and cfg.ppo.kl_coef == base.ppo.kl_coef == 0.2
        assert cfg.ppo.critic_warmup_iterations == (bench.WARMUP if name.endswith("_warmup") else 0)
    assert bench.compare_config(str(tmp_path), "separate_rm", 0, 150).model.value_init == "reward_model"
    assert bench.compare_config(str(tmp_path), "shared_head_only", 0, 150).model.value_grad_to_body is False
    assert not bench.applies("words", "separate_rm_warmup") and bench.applies("words", "separate_warmup")


def test_parameters_follow_the_checkpoints(tmp_path):
    _checkpoint(tmp_path / "sft", "lm_head")
    _checkpoint(tmp_path / "rm", "score")
    body, policy, head = 10 * 4 + 4, 10 * 4 + 4 + 10 * 4, 4 + 1
    count = lambda s: bench.parameters(bench.compare_config(str(tmp_path), s, 0, 150))  # noqa: E731
    assert count("shared") == {"policy": policy, "value_head": head, "critic_body": 0, "trained": policy + head,
                               "value_loss_reaches": body + head}
    assert count("shared_head_only")["value_loss_reaches"] == head
    assert count("separate_rm")["trained"] == policy + body + head  # the RM's score head is not in the body
    assert count("grpo") == {"policy": policy, "value_head": 0, "critic_body": 0, "trained": policy,
                             "value_loss_reaches": 0}


def test_spread_over_seeds_leaves_failed_runs_out():
    runs = [{"task": "compare", "setting": "grpo", "seed": s, "completed": s != 2, "parameters": {"trained": 1},
             "eval_gold_before": 0.5, "eval_gold_after": a, "kl_final": 0.1} for s, a in ((0, 0.7), (1, 0.9), (2, 0.0))]
    row = bench.per_setting(runs, "compare", ["grpo", "rloo"])
    assert set(row) == {"grpo"} and row["grpo"]["seeds"] == [0, 1]
    assert row["grpo"]["eval_gold_after"]["min"] == 0.7 and row["grpo"]["eval_gold_after"]["max"] == 0.9
    assert abs(row["grpo"]["gold_gain"]["mean"] - 0.3) < 1e-12
    assert bench.per_setting(runs, "words", ["separate_rm"])["separate_rm"]["n/a"]


def test_deadline_shortens_every_run_to_a_multiple_of_the_eval_period():
    probe = {"iteration_seconds": [0.5] * 150, "iterations_done": 150, "wall_s": 40 + 75}  # 40 s fixed
    assert bench.fit_iterations(probe, 30, time.time() + 30 * 115 * 2, 150) == 150  # fits: unchanged
    its = bench.fit_iterations(probe, 30, time.time() + 30 * 90, 150)  # 90 s each / 1.15 margin - 40 s: 76 its
    assert its == 75
    assert bench.fit_iterations(probe, 30, time.time() + 60, 150) == 50  # never below 50
