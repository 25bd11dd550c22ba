"""DAPO soft overlong punishment: hand examples, loop reference, properties."""

import pytest
import torch

from rlhf_ray.algorithms import overlong_penalty


def test_hand_example():
    # Budget 10, buffer 4: the ramp starts after 6 tokens and reaches -penalty at 10.
    lengths = torch.tensor([0, 6, 7, 8, 10, 12])
    assert overlong_penalty(lengths, 10, 4, 1.0).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 10, 4, 2.0).tolist() == [0.0, 0.0, -0.5, -1.0, -2.0, -2.0]


def test_buffer_edges():
    lengths = torch.tensor([0, 1, 4, 9, 10, 11])
    # buffer 1: no ramp, a cliff exactly at the budget.
    assert overlong_penalty(lengths, 10, 1, 1.0).tolist() == [0.0, 0.0, 0.0, 0.0, -1.0, -1.0]
    # buffer == budget: the ramp starts at length 0.
    assert overlong_penalty(lengths, 10, 10, 1.0).tolist() == pytest.approx([0.0, -0.1, -0.4, -0.9, -1.0, -1.0])
    assert (overlong_penalty(lengths, 10, 4, 0.0) == 0).all()


def _dapo_formula(length, l_max, l_cache, penalty):
    """DAPO (arXiv:2503.14476) soft overlong punishment, piecewise, scaled by ``penalty``."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return penalty * ((l_max - l_cache) - length) / l_cache
    return -penalty


@pytest.mark.parametrize("budget,buffer,penalty", [(16, 5, 1.0), (16, 16, 0.5), (7, 1, 2.0), (300, 64, 1.0)])
def test_matches_piecewise_formula(budget, buffer, penalty):
    g = torch.Generator().manual_seed(budget)
    lengths = torch.randint(0, budget + 8, (37,), generator=g)
    got = overlong_penalty(lengths.double(), budget, buffer, penalty)
    expected = [_dapo_formula(n, budget, buffer, penalty) for n in lengths.tolist()]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_monotone_bounded_and_dtypes():
    lengths = torch.arange(0, 40)
    out = overlong_penalty(lengths, 30, 12, 1.5)
    assert out.dtype == torch.float32 and out.shape == (40,)
    assert (out[1:] <= out[:-1]).all()
    assert out.min().item() == -1.5 and out.max().item() == 0.0
    assert overlong_penalty(lengths.int(), 30, 12, 1.5).dtype == torch.float32
    assert overlong_penalty(lengths.double(), 30, 12, 1.5).dtype == torch.float64
    before = lengths.clone()
    overlong_penalty(lengths, 30, 12, 1.5)
    assert torch.equal(lengths, before)


def test_bad_arguments_raise():
    lengths = torch.tensor([1, 2, 3])
    for buffer in (0, 11, -1):
        with pytest.raises(ValueError, match="buffer"):
            overlong_penalty(lengths, 10, buffer, 1.0)
    with pytest.raises(ValueError, match="penalty"):
        overlong_penalty(lengths, 10, 4, -1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        overlong_penalty(lengths, 0, 1, 1.0)
    with pytest.raises(ValueError, match="1-D"):
        overlong_penalty(lengths[None], 10, 4, 1.0)
