"""The reward role's model path: a batch with padding scores every text as it scores alone."""

from __future__ import annotations

import pytest
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

    from rlhf_ray.workers.frozen import RewardScorer, RewardSpec

    rm = _gpt2_reward_model(tmp_path / "rm")
    assert AutoTokenizer.from_pretrained(rm).padding_side == "left"
    cfg = load_config(None, {"model.path": rm, "reward.kind": "model", "reward.model_path": rm,
                             "reward.micro_batch_size": 4})
    scorer = RewardScorer(RewardSpec.from_config(cfg))
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


@pytest.mark.parametrize("packing", [True, False])
def test_reference_logprobs_skip_the_prompt_and_match_the_full_model(tmp_path, packing):
    """The reference role asks the LM head for the response positions only; the logprobs are
    those of a full forward pass of each sequence alone, on a batch with left-padded prompts and
    right-padded responses, padded or packed without padding."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.batch import Generation, pack_generation
    from rlhf_ray.tiny_models import build_tiny_model
    from rlhf_ray.workers.frozen import ReferenceModel, ReferenceSpec

    path = str(build_tiny_model(tmp_path / "ref", arch="llama", seed=3))
    cfg = load_config(None, {"model.path": path, "reference.micro_batch_size": 2, "reference.packing": packing})
    ref = ReferenceModel(ReferenceSpec.from_config(cfg))
    assert ref._keeps_logits  # Llama takes logits_to_keep: the short path is the one tested
    gen = Generation(prompt_ids=[[5, 6, 7, 8], [9, 10], [11, 12, 13]],
                     response_ids=[[20, 21], [22, 23, 24, 25], [26]],
                     logprobs=[[0.0] * 2, [0.0] * 4, [0.0]], finish_reasons=["length"] * 3,
                     prompt_index=[0, 1, 2])
    batch = pack_generation(gen, pad_id=0)
    got = ref.logprobs(batch, temperature=0.7)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    for row, (p_ids, r_ids) in enumerate(zip(gen.prompt_ids, gen.response_ids)):
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = torch.log_softmax(plain(input_ids=ids).logits[0].float() / 0.7, dim=-1)
        expected = [logp[len(p_ids) - 1 + t, tok].item() for t, tok in enumerate(r_ids)]
        torch.testing.assert_close(got[row, :len(r_ids)], torch.tensor(expected), atol=1e-5, rtol=0)
        assert torch.all(got[row, len(r_ids):] == 0)  # padding positions stay 0
