"""The reward role's model path: a batch with padding scores every text as it scores alone."""

from __future__ import annotations

import torch

from rlhf_ray.config import load_config


def _gpt2_reward_model(path) -> str:
    """A tiny GPT-2 reward model: learned absolute positions, so shifted positions change scores."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from rlhf_ray.tiny_models import build_tokenizer

    tok = build_tokenizer(seed=0, vocab_size=300)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                     pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2ForSequenceClassification(cfg)
    with torch.no_grad():  # make positions matter clearly
        model.transformer.wpe.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_left_padded_batch_scores_like_each_text_alone(tmp_path):
    from transformers import AutoTokenizer

    from rlhf_ray.workers.frozen import RewardScorer

    rm = _gpt2_reward_model(tmp_path / "rm")
    assert AutoTokenizer.from_pretrained(rm).padding_side == "left"
    cfg = load_config(None, {"model.path": rm, "reward.kind": "model", "reward.model_path": rm,
                             "reward.micro_batch_size": 4})
    scorer = RewardScorer(cfg)
    prompts = ["Write the number after 10:", "Hi", "a much longer prompt with many words in it", "x"]
    responses = [" 11", " there friend", "", " y z"]
    batched = scorer._run_model(prompts, responses)
    alone = torch.cat([scorer._run_model([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    # Without position_ids the shorter rows would see shifted positions and other scores.
    tok, model = scorer.rm_tokenizer, scorer.model
    enc = tok([p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True)
    with torch.no_grad():
        naive = model(**enc).logits[:, 0]
    assert (naive - alone).abs().max() > 1e-3
