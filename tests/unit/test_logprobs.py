"""Token log-probabilities and entropies from logits."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (chunked_logprobs_and_entropy, entropy_from_logits, logprobs_and_entropy,
                                 logprobs_from_logits)

LOG3 = math.log(3.0)


def _random_logits(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 5, 7, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    return logits, tokens


def _loop_logprob_entropy(logits, tokens, temperature):
    logp, ent = [], []
    for row_z, row_tok in zip(logits.double().tolist(), tokens.tolist()):
        lp_row, h_row = [], []
        for z, tok in zip(row_z, row_tok):
            z = [v / temperature for v in z]
            top = max(z)
            lse = top + math.log(sum(math.exp(v - top) for v in z))
            probs = [math.exp(v - lse) for v in z]
            lp_row.append(z[tok] - lse)
            h_row.append(-sum(p * (v - lse) for p, v in zip(probs, z)))
        logp.append(lp_row)
        ent.append(h_row)
    return logp, ent


# ---- hand-computed examples -------------------------------------------------


def test_logprobs_hand_example():
    logits = torch.tensor([[[0.0, LOG3], [0.0, LOG3]]])  # softmax = [0.25, 0.75]
    tokens = torch.tensor([[1, 0]])
    out = logprobs_from_logits(logits, tokens)
    torch.testing.assert_close(out, torch.tensor([[-0.28768207, -1.38629436]]))
    # T = 2: softmax([0, log3 / 2]) = [1, sqrt 3] / (1 + sqrt 3).
    tempered = logprobs_from_logits(logits, tokens, temperature=2.0)
    torch.testing.assert_close(tempered, torch.tensor([[-0.45574639, -1.00505254]]))


def test_entropy_hand_example():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, LOG3, -math.inf, -math.inf]]])
    out = entropy_from_logits(logits)
    # Uniform over 4: log 4; [0.25, 0.75] (banned tokens add 0): 0.5623351.
    torch.testing.assert_close(out, torch.tensor([[1.38629436, 0.56233514]]))
    tempered = entropy_from_logits(logits[:, 1:], temperature=2.0)
    torch.testing.assert_close(tempered, torch.tensor([[0.65680640]]))


# ---- float64 loop reference -------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_matches_loop_reference(temperature):
    logits, tokens = _random_logits(0)
    logp_ref, ent_ref = _loop_logprob_entropy(logits, tokens, temperature)
    logp = logprobs_from_logits(logits, tokens, temperature)
    ent = entropy_from_logits(logits, temperature)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == (3, 5)
    torch.testing.assert_close(logp.double().tolist(), logp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double().tolist(), ent_ref, rtol=1e-5, atol=1e-5)


def test_gradients_match_log_softmax_reference():
    logits, tokens = _random_logits(1)
    ours = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    weights = torch.randn(3, 5)
    (logprobs_from_logits(ours, tokens, 0.8) * weights).sum().backward()
    ref_logp = torch.log_softmax(ref / 0.8, -1).gather(-1, tokens[..., None])[..., 0]
    (ref_logp * weights).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad)
    ent_ours = logits.clone().requires_grad_(True)
    ent_ref = logits.clone().requires_grad_(True)
    (entropy_from_logits(ent_ours, 0.8) * weights).sum().backward()
    p = torch.softmax(ent_ref / 0.8, -1)
    (-(p * torch.log_softmax(ent_ref / 0.8, -1)).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(ent_ours.grad, ent_ref.grad)


# ---- invariances and robustness ----------------------------------------------


def test_logits_are_never_mutated():
    for dtype in (torch.float32, torch.bfloat16):
        logits, tokens = _random_logits(2, dtype)
        before = logits.clone()
        for temperature in (1.0, 0.5):
            logprobs_from_logits(logits, tokens, temperature)
            entropy_from_logits(logits, temperature)
        assert torch.equal(logits, before)


def test_bf16_logits_are_computed_in_float32():
    logits, tokens = _random_logits(3, torch.bfloat16)
    logp = logprobs_from_logits(logits, tokens)
    ent = entropy_from_logits(logits)
    assert logp.dtype == ent.dtype == torch.float32
    ref_logp, ref_ent = _loop_logprob_entropy(logits.float(), tokens, 1.0)
    torch.testing.assert_close(logp.double().tolist(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double().tolist(), ref_ent, rtol=1e-5, atol=1e-5)


def test_shift_invariance_and_large_logits():
    logits, tokens = _random_logits(4)
    shifted = logits + 1e4  # softmax is shift invariant; naive exp would overflow
    # Tolerance: float32 spacing at 1e4 is ~1e-3.
    base = logprobs_from_logits(logits, tokens)
    torch.testing.assert_close(logprobs_from_logits(shifted, tokens), base, atol=2e-3, rtol=0)
    torch.testing.assert_close(
        entropy_from_logits(shifted), entropy_from_logits(logits), atol=2e-3, rtol=0
    )
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-30)


def test_banned_tokens_give_finite_entropy_and_gradient():
    logits, _ = _random_logits(5)
    logits = logits.clone()
    logits[..., :3] = -math.inf
    logits.requires_grad_(True)
    ent = entropy_from_logits(logits)
    assert torch.isfinite(ent).all()
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    kept = logits.detach()[..., 3:]
    torch.testing.assert_close(ent, entropy_from_logits(kept))


def test_bad_arguments_raise():
    logits, tokens = _random_logits(6)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, tokens, 0.0)
    with pytest.raises(ValueError, match="integer"):
        logprobs_from_logits(logits, tokens.float())
    with pytest.raises(ValueError, match="tokens"):
        logprobs_from_logits(logits, tokens[:, :4])
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(logits, -1.0)


# ---- the fused function: one logsumexp for both ------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_fused_matches_loop_reference(temperature):
    logits, tokens = _random_logits(7)
    logp_ref, ent_ref = _loop_logprob_entropy(logits, tokens, temperature)
    logp, ent = logprobs_and_entropy(logits, tokens, temperature)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (3, 5)
    torch.testing.assert_close(logp.double().tolist(), logp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double().tolist(), ent_ref, rtol=1e-5, atol=1e-5)


def test_fused_gradients_match_the_separate_functions():
    logits, tokens = _random_logits(8)
    w_lp, w_ent = torch.randn(3, 5), torch.randn(3, 5)
    fused = logits.clone().requires_grad_(True)
    lp, ent = logprobs_and_entropy(fused, tokens, 0.8)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    apart = logits.clone().requires_grad_(True)
    ((logprobs_from_logits(apart, tokens, 0.8) * w_lp).sum()
     + (entropy_from_logits(apart, 0.8) * w_ent).sum()).backward()
    torch.testing.assert_close(fused.grad, apart.grad)


def test_fused_entropy_without_grad_leaves_logprob_grad_alone():
    logits, tokens = _random_logits(9)
    fused = logits.clone().requires_grad_(True)
    lp, ent = logprobs_and_entropy(fused, tokens, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    lp.sum().backward()
    plain = logits.clone().requires_grad_(True)
    logprobs_from_logits(plain, tokens).sum().backward()
    torch.testing.assert_close(fused.grad, plain.grad)
    torch.testing.assert_close(ent, entropy_from_logits(logits))


def test_fused_banned_tokens_and_large_logits():
    logits, tokens = _random_logits(10)
    logits = logits.clone()
    logits[..., :3] = -math.inf
    tokens = tokens.clamp(min=3)
    leaf = logits.clone().requires_grad_(True)
    lp, ent = logprobs_and_entropy(leaf, tokens)
    assert torch.isfinite(ent).all() and torch.isfinite(lp).all()
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(ent, entropy_from_logits(logits[..., 3:]))
    lp_big, ent_big = logprobs_and_entropy(logits + 1e4, tokens)  # float32 spacing at 1e4 ~ 1e-3
    torch.testing.assert_close(ent_big, ent, atol=2e-3, rtol=0)
    torch.testing.assert_close(lp_big, lp, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="tokens"):
        logprobs_and_entropy(logits, tokens[:, :4])
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(logits, tokens, 0.0)


# --------------------------------------------------------------------------- chunked


@pytest.mark.parametrize("entropy", ["none", "log", "grad"])
@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_chunked_equals_unchunked_in_values_and_gradients(entropy, chunk):
    gen = torch.Generator().manual_seed(5)
    B, R, V = 3, 5, 11  # 15 positions: chunks of 4 and 7 leave a ragged last chunk
    base = torch.randn(B, R, V, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, R), generator=gen)
    weights = torch.randn(B, R, generator=gen, dtype=torch.float64)

    def run(fn):
        logits = base.clone().to(torch.float32).requires_grad_(True)
        lp, ent = fn(logits)
        loss = (lp * weights).sum() + (0.3 * (ent * weights).sum() if ent is not None and entropy == "grad" else 0)
        loss.backward()
        return lp.detach(), None if ent is None else ent.detach(), logits.grad

    def whole(logits):
        if entropy == "none":
            return logprobs_from_logits(logits, tokens, 0.7), None
        return logprobs_and_entropy(logits, tokens, 0.7, entropy_grad=entropy == "grad")

    lp1, ent1, g1 = run(whole)
    lp2, ent2, g2 = run(lambda lg: chunked_logprobs_and_entropy(lg, tokens, 0.7, entropy, chunk))
    torch.testing.assert_close(lp2, lp1)
    torch.testing.assert_close(g2, g1)
    assert (ent1 is None) == (ent2 is None) == (entropy == "none")
    if ent1 is not None:
        torch.testing.assert_close(ent2, ent1)


def test_chunked_hand_example_and_errors():
    # Two tokens, uniform over 4 -> log(1/4); logits [0, log 3] at T=1 -> p = [1/4, 3/4].
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf]]])
    lp, ent = chunked_logprobs_and_entropy(logits, torch.tensor([[2, 1]]), entropy="log", chunk=1)
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.25), math.log(0.75)]]))
    torch.testing.assert_close(ent, torch.tensor([[math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]]))
    with pytest.raises(ValueError, match="entropy must be"):
        chunked_logprobs_and_entropy(logits, torch.tensor([[2, 1]]), entropy="yes")
    with pytest.raises(ValueError, match="chunk must be"):
        chunked_logprobs_and_entropy(logits, torch.tensor([[2, 1]]), chunk=0)


def test_chunked_of_no_positions_is_empty_and_differentiable():
    # A packed micro-batch whose samples were all quarantined has no response position.
    logits = torch.zeros(1, 0, 7, requires_grad=True)
    lp, ent = chunked_logprobs_and_entropy(logits, torch.zeros(1, 0, dtype=torch.long), entropy="grad")
    assert lp.shape == ent.shape == (1, 0)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == (1, 0, 7)
