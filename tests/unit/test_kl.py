"""KL estimators and controllers: hand examples, loop references, properties."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
)

# ---- estimators --------------------------------------------------------------


def test_estimators_hand_example():
    # log ratio (ref - policy) = -1, then +1, then 0.
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-2.0, -1.0, -0.5]])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([[0.5, 0.5, 0.0]]))
    # k3 = exp(-1) - (-1) - 1 = e^-1; exp(1) - 1 - 1 = e - 2.
    torch.testing.assert_close(
        kl_estimate(logp, ref, "k3"), torch.tensor([[0.36787944, 0.71828183, 0.0]])
    )
    assert torch.equal(kl_estimate(logp, ref), kl_estimate(logp, ref, "k1"))  # default


def test_estimators_match_loop_reference():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    formulas = {
        "k1": lambda p, q: p - q,
        "k2": lambda p, q: 0.5 * (p - q) ** 2,
        "k3": lambda p, q: math.exp(q - p) - (q - p) - 1.0,
    }
    rows = list(zip(logp.tolist(), ref.tolist()))
    for name, formula in formulas.items():
        expected = [[formula(p, q) for p, q in zip(row_p, row_q)] for row_p, row_q in rows]
        got = kl_estimate(logp, ref, name).tolist()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_k1_and_k3_are_unbiased_k2_is_not():
    # Exact expectation under pi over a small vocabulary (no sampling noise).
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    p = logp.exp()
    true_kl = (p * (logp - logq)).sum()
    for name in ("k1", "k3"):
        expectation = (p * kl_estimate(logp[None], logq[None], name)[0]).sum()
        torch.testing.assert_close(expectation, true_kl)
    k2 = (p * kl_estimate(logp[None], logq[None], "k2")[0]).sum()
    assert abs(k2.item() - true_kl.item()) > 1e-3
    assert true_kl.item() > 0.05  # the example is not degenerate


def test_k2_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(3, 5, generator=g)
    ref = torch.randn(3, 5, generator=g)
    assert (kl_estimate(logp, ref, "k1") < 0).any()  # k1 can be negative
    for name in ("k2", "k3"):
        assert (kl_estimate(logp, ref, name) >= 0).all()
    for name in KL_ESTIMATORS:
        assert (kl_estimate(logp, logp, name) == 0).all()


def test_k3_is_precise_for_close_policies():
    logp = torch.tensor([[-1.0]], dtype=torch.float64)
    ref = logp + 1e-6
    # k3 ~ x^2 / 2 for small x; a naive exp(x) - x - 1 loses most digits here.
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5e-12, rel=1e-5)


def test_unknown_estimator_and_shape_mismatch_raise():
    x = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(x, x, "low_var_kl")
    with pytest.raises(ValueError, match="shape"):
        kl_estimate(x, torch.zeros(5, 3))


def test_estimate_does_not_mutate_and_passes_gradients():
    logp = torch.randn(3, 5, requires_grad=True)
    ref = torch.randn(3, 5)
    before = (logp.detach().clone(), ref.clone())
    kl_estimate(logp, ref, "k3").sum().backward()
    assert torch.equal(logp.detach(), before[0]) and torch.equal(ref, before[1])
    # d k3 / d logp = 1 - exp(ref - logp)
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref - logp.detach()))


# ---- controllers -------------------------------------------------------------


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05
    state = ctl.state_dict()
    assert state == {"value": 0.05}
    other = FixedKLController(1.0)
    other.load_state_dict(state)
    assert other.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-0.1)


def test_adaptive_controller_hand_example():
    ctl = AdaptiveKLController(init_value=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # err = clip(0.5) = 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(current_kl=6.0, n_steps=256)  # on target: unchanged
    assert ctl.value == pytest.approx(0.100512)
    ctl.update(current_kl=5.4, n_steps=1000)  # err = -0.1
    assert ctl.value == pytest.approx(0.100512 * 0.99)
    ctl.update(current_kl=0.0, n_steps=1000)  # err = clip(-1) = -0.2
    assert ctl.value == pytest.approx(0.100512 * 0.99 * 0.98)


def test_adaptive_controller_matches_loop_reference():
    g = torch.Generator().manual_seed(3)
    kls = (torch.rand(20, generator=g) * 12).tolist()
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=500)
    value = 0.2
    for kl in kls:
        err = kl / 6.0 - 1.0
        err = 0.2 if err > 0.2 else (-0.2 if err < -0.2 else err)
        value = value * (1 + err * 64 / 500)
        ctl.update(kl, 64)
        assert ctl.value == pytest.approx(value, rel=1e-12)
    assert value != pytest.approx(0.2)


def test_adaptive_controller_state_round_trip():
    ctl = AdaptiveKLController(0.1, target=4.0, horizon=1000)
    for kl in (1.0, 8.0, 3.0):
        ctl.update(kl, 100)
    state = ctl.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    restored = AdaptiveKLController(0.5, target=4.0, horizon=1000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    ctl.update(7.0, 100)
    restored.update(7.0, 100)
    assert restored.value == ctl.value
    assert ctl.value != pytest.approx(0.1)


def test_adaptive_controller_validates_arguments():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError, match="init_value"):
        AdaptiveKLController(0.0, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="n_steps"):
        AdaptiveKLController(0.1, target=1.0, horizon=10).update(1.0, -1)
