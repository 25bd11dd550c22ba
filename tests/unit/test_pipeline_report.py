"""What the main job prints at the end: stage lines, the side-by-side answers and the verdict."""

from __future__ import annotations

from rlhf_ray.pipeline import format_summary, verdict


def _summary() -> dict:
    row = {"prompt": "Q: which is larger, 47 or 52? A:", "before": {"response": " 47", "reward": -1.25, "gold": 0.0},
           "after": {"response": " 52", "reward": 1.5, "gold": 1.0}}
    return {
        "sft": {"train_loss_first_step": 6.3, "train_loss_last_epoch": 0.7, "eval_before": {"loss": 6.2},
                "eval_after": {"loss": 0.8}},
        "rm": {"eval_before": {"accuracy": 0.5}, "eval_after": {"accuracy": 0.97}},
        "ppo": {"reward_start": 0.3, "reward_end": 1.2, "kl_start": 0.05, "kl_end": 0.8, "iterations": 150,
                "run_dir": "runs/x"},
        "before_after": {"first_iteration": 0, "last_iteration": 150, "temperature": 1.0, "responses": 400,
                         "reward": [0.374, 1.254], "gold": [0.5675, 0.795], "kl_end": 0.8, "samples_md": "runs/x/samples.md",
                         "rows": [row]},
        "seconds": {"sft": 20.0, "rm": 30.0, "ppo": 80.0, "total": 140.0},
    }


def test_verdict_line_states_gold_reward_and_kl():
    line = verdict(_summary()["before_after"])
    assert line == ("VERDICT: held-out gold accuracy 0.568 -> 0.795 (400 answers, sampled at temperature 1); "
                    "held-out RM reward 0.374 -> 1.254; final KL 0.800")


def test_summary_shows_each_stage_and_the_answers_side_by_side():
    text = format_summary(_summary())
    assert "SFT: train loss 6.300 (first step) -> 0.700" in text
    assert "RM: held-out pairwise accuracy 0.500 -> 0.970" in text
    assert "PPO: RM reward 0.300 -> 1.200" in text
    assert "'Q: which is larger, 47 or 52? A:': ' 47' (RM -1.25, wrong) -> ' 52' (RM 1.50, right)" in text
    assert "(all of them: runs/x/samples.md)" in text
    assert text.index("VERDICT") > text.index("' 52' (RM 1.50, right)")


def test_verdict_without_a_gold_check_or_a_greedy_evaluation():
    ba = {**_summary()["before_after"], "gold": [None, None], "temperature": 0.0, "kl_end": None}
    assert verdict(ba) == "VERDICT: held-out RM reward 0.374 -> 1.254; final KL n/a"


def test_a_function_reward_is_not_called_rm_in_the_answers():
    s = _summary()
    s["ppo"]["reward_kind"] = "function"
    text = format_summary(s)
    assert "' 47' (reward -1.25, wrong) -> ' 52' (reward 1.50, right)" in text and "(RM " not in text
