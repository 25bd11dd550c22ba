"""Reward-model training under ZeRO-3 on two ranks with a tokenizer whose pad token is EOS (as
Llama 3's, Mistral's and Qwen2.5 base's), then PPO's reward actor on the saved checkpoint.

The score is read at each sequence's last attended token (``rlhf_ray/models/reward_head.py``)
through a hook on the score head inside the engine's own forward call, so ZeRO-3's parameter
gathers run as for any forward. Checked here: training runs and learns, the reward actor ranks
the held-out pairs exactly as the trainer's evaluation did, and a finished answer (EOS) and the
same answer cut off score apart, which transformers' own pooling (last token that is not the pad
id) could not tell apart with pad == EOS.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.integration.conftest import small_config

pytestmark = pytest.mark.integration

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _start_model_with_pad_eos(path) -> str:
    """A tiny Llama reward model whose tokenizer and config both take EOS as the pad id."""
    from transformers import AutoConfig, AutoTokenizer

    from rlhf_ray.tiny_models import build_tiny_model

    start = str(build_tiny_model(path, kind="reward", tokenizer_seed=0))
    tok = AutoTokenizer.from_pretrained(start)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(start)
    config = AutoConfig.from_pretrained(start)
    config.pad_token_id = tok.eos_token_id
    config.save_pretrained(start)
    return start


def test_rm_zero3_with_pad_eos_trains_and_the_reward_actor_reads_the_eos(ray_cluster, tiny_llama, tmp_path,
                                                                          capsys):
    from transformers import AutoTokenizer

    from rlhf_ray import train_rm
    from rlhf_ray.batch import Generation, pack_generation
    from rlhf_ray.data.demo_data import write_demo_data
    from rlhf_ray.supervised.data import holdout_split
    from rlhf_ray.workers.frozen import RewardScorer, RewardSpec

    demo = write_demo_data(str(tmp_path / "demo"), seed=0, n_sft=8, n_pairs=400, n_prompts=8)
    start = _start_model_with_pad_eos(tmp_path / "rm0")
    out = tmp_path / "rm"
    argv = ["--config", os.path.join(CONFIGS, "rm_cpu.yaml"), "--name", "it_rm_pad_eos", "--model.path", start,
            "--data.train_path", demo["preference.jsonl"], "--data.demo", "false", "--train.output_dir", str(out),
            "--train.epochs", "2", "--learner.lr", "0.003", "--learner.num_ranks", "2", "--learner.zero_stage", "3"]
    assert train_rm.main(argv) == 0
    assert "held-out pairwise accuracy" in capsys.readouterr().out
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert rows[-1]["train/loss"] < rows[1]["train/first_step_loss"]

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token_id == tok.eos_token_id
    cfg = small_config(tiny_llama, **{"reward.kind": "model", "reward.model_path": str(out)})
    scorer = RewardScorer(RewardSpec.from_config(cfg))
    with open(demo["preference.jsonl"]) as fh:
        records = [json.loads(line) for line in fh]
    _, held = holdout_split(len(records), 0.1, seed=0)
    prompts, responses = [], []
    for i in held:
        prompts += [records[i]["prompt"]] * 2
        responses += [records[i]["chosen"], records[i]["rejected"]]
    p_ids = [tok(p)["input_ids"] for p in prompts]

    def scores(finished: bool):
        r_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * finished for r in responses]
        gen = Generation(p_ids, r_ids, [[0.0] * len(r) for r in r_ids], ["stop" if finished else "length"] * len(r_ids),
                         list(range(len(r_ids))))
        return scorer.score(pack_generation(gen, tok.pad_token_id, [tok.eos_token_id]))

    finished = scores(True)
    # The actor ranks the held-out pairs as the trainer's evaluation did (it read the same positions).
    assert (finished[0::2] > finished[1::2]).float().mean().item() == pytest.approx(rows[-1]["eval/accuracy"],
                                                                                    abs=1e-6)
    gap = (finished[0::2] - finished[1::2]).mean().item()
    assert gap == pytest.approx(rows[-1]["eval/reward_gap"], rel=1e-3, abs=1e-4)
    # With pad == EOS a finished answer and the same answer cut off still score apart.
    assert (finished - scores(False)).abs().min().item() > 1e-5
