"""Tests for rlhf_ray.models: value head, shared-body actor-critic, policy export."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from rlhf_ray.models import (
    ActorCritic,
    ValueHead,
    disable_dropout,
    load_value_head,
    policy_parameter_names,
    policy_state_dict,
    positions_from_mask,
)
from rlhf_ray.tiny_models import build_tiny_model

B, T = 3, 7  # B != T so a reduction over the wrong axis fails loudly


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ac")
    return {arch: str(build_tiny_model(root / arch, arch=arch, seed=11)) for arch in ("llama", "qwen2")}


def left_padded_batch(vocab: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, position_ids (B, T) with rows padded by 0, 2 and 4 tokens."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (B, T), generator=gen)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    for row, n_pad in enumerate((0, 2, 4)):
        input_ids[row, :n_pad] = 0
        attention_mask[row, :n_pad] = 0
    return input_ids, attention_mask, positions_from_mask(attention_mask)


def load_policy(path: str, **config_overrides) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path, **config_overrides)
    return AutoModelForCausalLM.from_pretrained(path, config=config)


def test_positions_from_mask_counts_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_value_head_float32_and_zero_init():
    head = ValueHead(8)
    hidden = torch.randn(B, T, 8, dtype=torch.bfloat16)
    values = head(hidden)
    assert values.shape == (B, T) and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros(B, T))
    head.to(torch.bfloat16)  # a whole-model dtype cast must leave the head float32
    assert head.linear.weight.dtype == torch.float32
    std_head = ValueHead(256, init_std=0.5)
    assert std_head.linear.bias.item() == 0.0
    assert 0.4 < std_head.linear.weight.std().item() < 0.6


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_equal_plain_model_on_left_padded_batch(model_dirs, arch):
    plain = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()
    ac = ActorCritic.from_pretrained(model_dirs[arch]).eval()
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        expected = plain(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        out = ac(input_ids, attention_mask, position_ids)
        default_pos = ac(input_ids, attention_mask)  # position_ids derived from the mask
        # Row 2 (4 pads) must match the same tokens without padding.
        unpadded = ac(input_ids[2:, 4:], attention_mask[2:, 4:])
    assert out.logits.shape == (B, T, 512)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(default_pos.logits, out.logits, atol=0, rtol=0)
    torch.testing.assert_close(unpadded.logits[0], out.logits[2, 4:], atol=1e-5, rtol=0)
    assert out.values.shape == (B, T) and out.values.dtype == torch.float32
    assert torch.equal(out.values, torch.zeros(B, T))  # zero-init head


def test_values_match_head_on_body_hidden_states(model_dirs):
    ac = ActorCritic.from_pretrained(model_dirs["llama"], value_head_init_std=0.3).eval()
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        out = ac(input_ids, attention_mask, position_ids)
        hidden = ac.policy.model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids).last_hidden_state
    expected = hidden @ ac.value_head.linear.weight[0] + ac.value_head.linear.bias[0]
    torch.testing.assert_close(out.values, expected, atol=1e-6, rtol=1e-6)
    assert out.values.abs().max().item() > 0.1


@pytest.mark.parametrize("separate_critic", [False, True])
def test_response_len_keeps_only_the_positions_that_predict_the_response(model_dirs, separate_critic):
    ac = ActorCritic.from_pretrained(model_dirs["llama"], value_head_init_std=0.3,
                                     separate_critic=separate_critic).eval()
    input_ids, attention_mask, position_ids = left_padded_batch()
    R = 3  # the last 3 of T=7 tokens are the response; positions 3, 4, 5 predict them
    with torch.no_grad():
        full = ac(input_ids, attention_mask, position_ids)
        short = ac(input_ids, attention_mask, position_ids, response_len=R)
    assert short.logits.shape == (B, R, 512) and short.values.shape == (B, R)
    # Not bitwise: the LM head's matmul runs over another shape (other BLAS blocking).
    torch.testing.assert_close(short.logits, full.logits[:, T - R - 1:T - 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(short.values, full.values[:, T - R - 1:T - 1], atol=1e-6, rtol=0)
    for bad in (0, T):
        with pytest.raises(ValueError, match="response_len"):
            ac(input_ids, attention_mask, position_ids, response_len=bad)


def _grads_after_value_loss(ac: ActorCritic) -> tuple[dict[str, torch.Tensor | None], torch.Tensor | None]:
    input_ids, attention_mask, position_ids = left_padded_batch()
    out = ac(input_ids, attention_mask, position_ids)
    ((out.values - 1.0) ** 2).mean().backward()
    body = {n: p.grad for n, p in ac.named_parameters() if not n.startswith("value_head.")}
    return body, ac.value_head.linear.weight.grad


def _has_grad(grad: torch.Tensor | None) -> bool:
    return grad is not None and grad.abs().sum().item() > 0


@pytest.mark.parametrize("to_body", [True, False])
def test_value_gradient_reaches_body_only_when_asked(model_dirs, to_body):
    ac = ActorCritic.from_pretrained(model_dirs["llama"], value_head_init_std=0.1, value_grad_to_body=to_body)
    body_grads, head_grad = _grads_after_value_loss(ac)
    assert _has_grad(head_grad)
    with_grad = [n for n, g in body_grads.items() if _has_grad(g)]
    if to_body:
        assert "policy.model.layers.0.mlp.up_proj.weight" in with_grad
        assert "policy.model.embed_tokens.weight" in with_grad
        assert "policy.lm_head.weight" not in with_grad  # values do not pass the LM head
    else:
        assert with_grad == []


def test_separate_critic_takes_value_gradients(model_dirs):
    ac = ActorCritic.from_pretrained(model_dirs["llama"], value_head_init_std=0.1, separate_critic=True)
    assert ac.separate_critic
    body_grads, head_grad = _grads_after_value_loss(ac)
    assert _has_grad(head_grad)
    assert [n for n, g in body_grads.items() if n.startswith("policy.") and _has_grad(g)] == []
    assert _has_grad(body_grads["critic_body.layers.0.mlp.up_proj.weight"])
    # A policy loss does not touch the critic body.
    ac.zero_grad(set_to_none=True)
    input_ids, attention_mask, position_ids = left_padded_batch()
    ac(input_ids, attention_mask, position_ids).logits.logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in ac.critic_body.parameters())
    assert _has_grad(ac.policy.lm_head.weight.grad)


def test_separate_critic_values_ignore_policy_weights(model_dirs):
    ac = ActorCritic.from_pretrained(model_dirs["llama"], value_head_init_std=0.3, separate_critic=True).eval()
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        before = ac(input_ids, attention_mask, position_ids)
        ac.policy.model.layers[0].mlp.up_proj.weight.mul_(3.0)
        after = ac(input_ids, attention_mask, position_ids)
    assert torch.equal(before.values, after.values)
    assert not torch.allclose(before.logits, after.logits)


def test_dropout_disabled_train_equals_eval(model_dirs):
    input_ids, attention_mask, position_ids = left_padded_batch()
    noisy = load_policy(model_dirs["llama"], attention_dropout=0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        train_logits = noisy.train()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids).logits
        eval_logits = noisy.eval()(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids).logits
    assert not torch.allclose(train_logits, eval_logits, atol=1e-3)  # control: dropout is live

    ac = ActorCritic(noisy, value_head_init_std=0.1)
    assert ac.policy.config.attention_dropout == 0.0
    with torch.no_grad():
        train_out = ac.train()(input_ids, attention_mask, position_ids)
        eval_out = ac.eval()(input_ids, attention_mask, position_ids)
    assert torch.equal(train_out.logits, eval_out.logits)
    assert torch.equal(train_out.values, eval_out.values)


def test_disable_dropout_zeroes_modules_and_configs():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3))
    model.attn_pdrop = 0.2
    disable_dropout(model)
    assert model[1].p == 0.0 and model.attn_pdrop == 0.0


def test_save_round_trip(model_dirs, tmp_path):
    ac = ActorCritic.from_pretrained(model_dirs["qwen2"], value_head_init_std=0.2).eval()
    tok = AutoTokenizer.from_pretrained(model_dirs["qwen2"])
    with torch.no_grad():
        ac.policy.model.norm.weight.mul_(1.5)  # differ from the source checkpoint
    out_dir = ac.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    input_ids, attention_mask, position_ids = left_padded_batch()
    reloaded_plain = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    reloaded = ActorCritic.from_pretrained(out_dir).eval()
    with torch.no_grad():
        expected = ac(input_ids, attention_mask, position_ids)
        plain_logits = reloaded_plain(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids).logits
        again = reloaded(input_ids, attention_mask, position_ids)
    assert torch.equal(plain_logits, expected.logits)
    assert torch.equal(again.values, expected.values)
    assert torch.equal(reloaded.value_head.linear.weight, ac.value_head.linear.weight)
    assert AutoTokenizer.from_pretrained(out_dir).get_vocab() == tok.get_vocab()
    assert set(load_value_head(out_dir)) == {"linear.weight", "linear.bias"}


def _safetensors_keys(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def test_save_from_gathered_state_dict_with_separate_critic(model_dirs, tmp_path):
    ac = ActorCritic.from_pretrained(model_dirs["llama"], value_head_init_std=0.2, separate_critic=True)
    full = {k: v.clone() for k, v in ac.state_dict().items()}  # stands in for a ZeRO-3 gather
    full["policy.lm_head.weight"].add_(1.0)
    full["critic_body.norm.weight"].add_(2.0)
    policy_sd, head_sd, critic_sd = ActorCritic.split_state_dict(full)
    assert set(head_sd) == {"linear.weight", "linear.bias"}
    assert "lm_head.weight" in policy_sd and "norm.weight" in critic_sd
    out_dir = ac.save_pretrained(tmp_path / "ckpt", state_dict=full)
    reloaded = ActorCritic.from_pretrained(out_dir, separate_critic=True)
    assert torch.equal(reloaded.policy.lm_head.weight, full["policy.lm_head.weight"])
    assert torch.equal(reloaded.critic_body.norm.weight, full["critic_body.norm.weight"])
    assert torch.equal(reloaded.value_head.linear.weight, full["value_head.linear.weight"])
    assert _safetensors_keys(out_dir) == {hf for _, hf in policy_parameter_names(ac)}
    assert isinstance(AutoModel.from_pretrained(out_dir / "critic"), type(ac.critic_body))


def test_policy_parameter_names_match_checkpoint(model_dirs, tmp_path):
    ac = ActorCritic.from_pretrained(model_dirs["llama"], separate_critic=True)
    pairs = policy_parameter_names(ac)
    assert ("policy.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight") in pairs
    assert all(not n.startswith(("value_head", "critic_body")) for n, _ in pairs)
    n_policy = sum(p.numel() for p in ac.policy.parameters())
    assert sum(dict(ac.named_parameters())[n].numel() for n, _ in pairs) == n_policy
    ac.save_pretrained(tmp_path / "ckpt")
    hf_names = [hf for _, hf in pairs]
    assert len(hf_names) == len(set(hf_names))
    assert set(hf_names) == _safetensors_keys(tmp_path / "ckpt")
    sd = policy_state_dict(ac)
    assert list(sd) == hf_names
    assert all(not t.requires_grad for t in sd.values())
    assert torch.equal(sd["lm_head.weight"], ac.policy.lm_head.weight)


def test_tied_embeddings_exported_once(model_dirs, tmp_path):
    config = AutoConfig.from_pretrained(model_dirs["qwen2"], tie_word_embeddings=True)
    policy = AutoModelForCausalLM.from_config(config)
    assert policy.lm_head.weight is policy.model.embed_tokens.weight
    ac = ActorCritic(policy)
    hf_names = [hf for _, hf in policy_parameter_names(ac)]
    assert "model.embed_tokens.weight" in hf_names and "lm_head.weight" not in hf_names
    ac.save_pretrained(tmp_path / "tied")
    assert set(hf_names) == _safetensors_keys(tmp_path / "tied")


# --------------------------------------------------------------------------- packed rows, detached head


def _varied_batch(vocab: int = 400):
    from rlhf_ray.batch import Generation, pack_generation

    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]
    responses = [[20, 21, 22, 23], [24], [25, 26], [27, 28, 29]]
    gen = Generation(prompts, responses, [[0.0] * len(r) for r in responses], ["stop"] * 4, [0, 1, 2, 3])
    return pack_generation(gen, pad_id=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_give_the_padded_forward_logits_and_values(model_dirs, arch):
    from rlhf_ray.batch import pack_rows

    model = ActorCritic.from_pretrained(model_dirs[arch], value_head_init_std=0.1).eval()
    batch = _varied_batch()
    R = batch.response_mask.shape[1]
    mask = batch.response_mask
    with torch.no_grad():
        padded = model(batch.input_ids, batch.attention_mask.long(), batch.position_ids, response_len=R)
    # Default rows (9 tokens: [seq 0], [seq 2, seq 3], [seq 1 + a filler run]) and one row.
    for rows in (pack_rows(batch), pack_rows(batch, row_tokens=10**6)):
        with torch.no_grad():
            packed = model(rows.input_ids, None, rows.position_ids, keep_index=rows.keep_index)
        assert packed.logits.shape == (1, int(mask.sum()), padded.logits.shape[-1])
        assert rows.num_tokens < batch.input_ids.numel()  # the padding is gone
        torch.testing.assert_close(packed.logits[0], padded.logits[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.values[0], padded.values[mask], atol=1e-5, rtol=1e-5)
    assert pack_rows(batch).input_ids.shape == (3, 9)


def test_packing_without_the_sequence_restarts_would_leak_attention(model_dirs):
    # The check above can fail: positions that do not restart make one long sequence.
    from rlhf_ray.batch import pack_rows

    model = ActorCritic.from_pretrained(model_dirs["llama"]).eval()
    batch = _varied_batch()
    rows = pack_rows(batch, row_tokens=10**6)  # one row
    R = batch.response_mask.shape[1]
    with torch.no_grad():
        padded = model(batch.input_ids, batch.attention_mask.long(), batch.position_ids, response_len=R)
        joined = model(rows.input_ids, None, torch.arange(rows.num_tokens).unsqueeze(0), keep_index=rows.keep_index)
    assert (joined.logits[0] - padded.logits[batch.response_mask]).abs().max() > 1e-3


def test_detached_value_head_returns_the_hidden_states_it_reads(model_dirs):
    model = ActorCritic.from_pretrained(model_dirs["llama"], value_head_init_std=0.1).eval()
    ids, mask, pos = left_padded_batch()
    with torch.no_grad():
        whole = model(ids, mask, pos, response_len=3)
    head = model.detach_value_head()
    assert model.value_head is None and "value_head.linear.weight" not in dict(model.named_parameters())
    with torch.no_grad():
        out = model(ids, mask, pos, response_len=3)
    assert out.values is None and out.value_hidden.shape == (B, 3, model.policy.config.hidden_size)
    torch.testing.assert_close(head(out.value_hidden), whole.values)
    assert head(out.value_hidden.bfloat16()).dtype == torch.float32
    with pytest.raises(RuntimeError, match="already detached"):
        model.detach_value_head()


def test_response_positions_hand_example():
    from rlhf_ray.models import response_positions

    tokens = torch.arange(5)  # T = 5, the last R = 2 tokens (3, 4) are the response
    assert tokens[response_positions(2)].tolist() == [2, 3]  # the positions that predict them
    assert tokens[response_positions(4)].tolist() == [0, 1, 2, 3]


def test_packed_rows_keep_sequences_apart_with_a_flash_like_kernel(model_dirs):
    """A kernel that takes no mask (like flash attention) keeps several packed rows' sequences
    apart only through the varlen boundaries the actor-critic passes (transformers' own flash
    path detects packing in a single row only)."""
    from rlhf_ray.batch import pack_rows
    from tests.inprocess import register_test_attentions

    varlen, _ = register_test_attentions()
    model = ActorCritic.from_pretrained(model_dirs["llama"], value_head_init_std=0.1,
                                        attn_implementation=varlen).eval()
    assert model.policy.config._attn_implementation == varlen
    batch = _varied_batch()
    mask = batch.response_mask
    rows = pack_rows(batch)
    assert rows.input_ids.shape[0] > 1  # several rows, one with two sequences
    with torch.no_grad():
        padded = model(batch.input_ids, batch.attention_mask.long(), batch.position_ids,
                       response_len=mask.shape[1])
        packed = model(rows.input_ids, None, rows.position_ids, keep_index=rows.keep_index)
    torch.testing.assert_close(packed.logits[0], padded.logits[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.values[0], padded.values[mask], atol=1e-5, rtol=1e-5)
