"""The reward-model trainer in one process (world size 1, gloo on CPU) under ZeRO-2 and ZeRO-3,
with a tokenizer whose pad token is EOS (Llama 3, Mistral, Qwen2.5 base).

The trainer reads each side's reward at its last attended token through a hook on the score
head inside the engine's own forward call (``rlhf_ray/models/reward_head.py``). Checked here,
with DeepSpeed's parameter hooks in place (ZeRO-3 gathers the partitioned weights around each
submodule): the rewards are those of a plain transformers model of the same weights read at the
final EOS, a finished side and the same side without its EOS get different rewards, and one
epoch of training runs with a finite loss. No Ray.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

# DeepSpeed's own calls of renamed torch.distributed functions: noise here.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.distributed\.\w+` is deprecated:FutureWarning")

PAIRS = [("Q: what is 2 plus 3? A:", " 5", " five"), ("Write the number after 7:", " 8", " eight, I think"),
         ("a dog sees 4 birds. How many?", " 4", " four birds"), ("Q: what is 6 plus 1? A:", " 7", " seven")]


@pytest.fixture(scope="module")
def rm_pad_eos(tmp_path_factory) -> str:
    """A tiny Llama reward model whose tokenizer and config take EOS as the pad id."""
    from transformers import AutoConfig, AutoTokenizer

    from rlhf_ray.tiny_models import build_tiny_model

    path = str(build_tiny_model(tmp_path_factory.mktemp("rm") / "rm", kind="reward", seed=1))
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    config.pad_token_id = tok.eos_token_id
    config.save_pretrained(path)
    return path


def _without_last_token(batch, pad_id: int):
    from rlhf_ray.supervised.data import PairBatch

    sides = []
    for ids, mask in ((batch.chosen_ids, batch.chosen_mask), (batch.rejected_ids, batch.rejected_mask)):
        ids, mask = ids.clone(), mask.clone()
        mask[torch.arange(len(batch)), mask.sum(1) - 1] = False
        ids[~mask] = pad_id
        sides += [ids, mask]
    return PairBatch(*sides)


@pytest.mark.parametrize("stage", [2, 3])
def test_rm_trainer_reads_the_final_eos_under_zero(rm_pad_eos, tmp_path, stage):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_ray.config import LearnerConfig
    from rlhf_ray.models.reward_head import pooled_scores, score_head
    from rlhf_ray.supervised.config import PreferenceDataConfig, RMRunConfig, TrainConfig, TrainModelConfig
    from rlhf_ray.supervised.data import load_preference_data
    from rlhf_ray.supervised.trainer import RewardModelTrainer
    from rlhf_ray.weight_sync.transport import free_port

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    cfg = RMRunConfig(model=TrainModelConfig(path=rm_pad_eos),
                      data=PreferenceDataConfig(train_path=str(pairs), eval_fraction=0.0),
                      train=TrainConfig(batch_size=4, shuffle=False, output_dir=str(tmp_path / "out")),
                      learner=LearnerConfig(num_ranks=1, zero_stage=stage, micro_batch_size=2, forward_batch_size=4))
    tok = AutoTokenizer.from_pretrained(rm_pad_eos)
    data = load_preference_data(cfg.data, tok, cfg.seed).train
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos and data.chosen_ids[0][data.chosen_mask[0]].tolist()[-1] == eos

    trainer = RewardModelTrainer(cfg, rank=0, world_size=1)
    info = trainer.setup("127.0.0.1", free_port(), total_steps=1)
    assert info["zero_stage"] == stage and trainer.pad_id == eos
    trainer.set_data(data, None)

    def rewards(batch) -> torch.Tensor:
        with torch.no_grad():
            _, stats = trainer._loss(batch.trim(), float(len(batch)))
        return torch.stack([stats["reward_chosen"], stats["reward_rejected"]])

    one = lambda i: data.select([i])  # noqa: E731  (one pair at a time: sums are the pair's rewards)
    finished = torch.stack([rewards(one(i)) for i in range(len(data))])
    cut = torch.stack([rewards(_without_last_token(one(i), eos)) for i in range(len(data))])
    assert (finished - cut).abs().min() > 1e-4

    # The same weights in a plain transformers model, read at the final EOS.
    plain = AutoModelForSequenceClassification.from_pretrained(rm_pad_eos, dtype=torch.float32).eval()
    for i in range(len(data)):
        for side, (ids, mask) in enumerate(((data.chosen_ids, data.chosen_mask),
                                            (data.rejected_ids, data.rejected_mask))):
            row = ids[i][mask[i]].unsqueeze(0)
            with torch.no_grad():
                want = pooled_scores(plain, score_head(plain), row, torch.ones_like(row, dtype=torch.bool))[0, 0]
            assert finished[i, side].item() == pytest.approx(want.item(), abs=1e-5)

    metrics = trainer.train_epoch(0)
    assert metrics["train/steps"] == 1.0 and math.isfinite(metrics["train/loss"])
