"""The learner's loss on one micro-batch (``workers/objective.py``) with the off-policy correction:
hand-computed values in literals."""

import math

import pytest
import torch

from rlhf_ray.batch import ExperienceBatch
from rlhf_ray.config import Config, PPOConfig
from rlhf_ray.workers.objective import ppo_objective

# B=2 sequences, R=3 response tokens; row 0 has 3 tokens, row 1 one. Raw weights
# w = exp(old - rollout) = [[1, 3, .25], [1.5, -, -]]: old = log w, rollout = 0.
MASK = torch.tensor([[True, True, True], [True, False, False]])
W = torch.tensor([[1.0, 3.0, 0.25], [1.5, 1.0, 1.0]])
OLD = torch.where(MASK, W.log(), torch.tensor(-5.0))
ROLLOUT = torch.where(MASK, torch.tensor(0.0), torch.tensor(math.nan))


def _batch(ref_gap: float = 1.0) -> ExperienceBatch:
    B, P, R = 2, 1, 3
    return ExperienceBatch(
        input_ids=torch.ones(B, P + R, dtype=torch.long), attention_mask=torch.ones(B, P + R, dtype=torch.bool),
        position_ids=torch.arange(P + R).expand(B, -1), response_mask=MASK, rollout_logprobs=ROLLOUT,
        truncated=torch.zeros(B, dtype=torch.bool), prompt_index=torch.arange(B),
        ref_logprobs=OLD - ref_gap, old_logprobs=OLD, advantages=torch.ones(B, R))


def _ppo(**fields) -> PPOConfig:
    return Config(ppo=PPOConfig(entropy_coef=0.0, **fields)).ppo


def _loss(p: PPOConfig, kl_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    lp = OLD.clone().requires_grad_(True)  # on policy: r = 1, surrogate -A = -1 per token
    out = ppo_objective(p, _batch(), lp, None, torch.zeros(2, 3), step_tokens=4, step_sequences=2,
                        kl_coef=kl_coef, max_len=3)
    out.loss.backward()
    return out.loss.detach(), lp.grad


def test_icepop_weights_kept_tokens_and_keeps_the_sequence_length():
    # Kept tokens weighted by w (1 and 1.5), w = 3 and .25 dropped: per sequence the token mean
    # over its full length, (-1/3 - 1.5) / 2 = -11/12 (IcePop, arXiv:2510.18855).
    p = _ppo(rollout_correction="icepop", correction_low=0.5, correction_high=2.0, loss_agg="seq_mean_token_mean")
    loss, grad = _loss(p)
    assert loss.item() == pytest.approx(-11 / 12)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 6, 0.0, 0.0], [-0.75, 0.0, 0.0]]))


def test_icepop_token_mean_hand_value():
    p = _ppo(rollout_correction="icepop", correction_low=0.5, correction_high=2.0, loss_agg="token_mean")
    loss, _ = _loss(p)
    assert loss.item() == pytest.approx(-(1.0 + 1.5) / 4)


def test_icepop_leaves_the_kl_term_on_every_valid_token():
    # k2 with reference = old - 1: 0.5 per token, times kl_coef 0.2 = 0.1 on all four valid tokens:
    # row 0 (-1 + 0.3) / 3, row 1 -1.5 + 0.1; loss (-7/30 - 1.4) / 2 = -49/60.
    p = _ppo(rollout_correction="icepop", correction_low=0.5, correction_high=2.0, loss_agg="seq_mean_token_mean",
             kl_in="loss", kl_estimator="k2")
    loss, _ = _loss(p, kl_coef=0.2)
    assert loss.item() == pytest.approx(-49 / 60)


def test_tis_truncates_the_weights():
    # min(w, 2) = [[1, 2, .25], [1.5]]: token mean -(1 + 2 + .25 + 1.5) / 4
    loss, _ = _loss(_ppo(rollout_correction="tis", correction_cap=2.0, loss_agg="token_mean"))
    assert loss.item() == pytest.approx(-4.75 / 4)


def test_clip_hand_example_loss_gradient_and_stats():
    # One sequence, 3 valid tokens (a 4th is padding) with ratios 1.5, .5, 1.1 and advantages 1, -1, 2:
    # r=1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped); r=.5, A=-1: max(.5, .8) = .8 (clipped);
    # r=1.1, A=2: -2.2 in both branches. Only the unclipped token has a gradient, -A r / 3.
    mask = torch.tensor([[True, True, True, False]])
    zeros = torch.zeros(1, 4)
    mb = ExperienceBatch(
        input_ids=torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 5, dtype=torch.bool),
        position_ids=torch.arange(5)[None], response_mask=mask, rollout_logprobs=zeros,
        truncated=torch.zeros(1, dtype=torch.bool), prompt_index=torch.zeros(1, dtype=torch.long),
        old_logprobs=zeros, advantages=torch.tensor([[1.0, -1.0, 2.0, 100.0]]))
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 7.0]])).requires_grad_(True)
    out = ppo_objective(_ppo(), mb, lp, None, torch.zeros(1, 4), step_tokens=3, step_sequences=1,
                        kl_coef=0.0, max_len=4)
    out.loss.backward()
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, -2.2 / 3, 0.0]]))
    assert out.stats["policy_loss"].item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert out.stats["clip_fraction"].item() == pytest.approx(2 / 3)
    kl = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]  # k3 of KL(old || new) per token
    assert out.stats["policy_kl"].item() == pytest.approx(sum(kl) / 3)
    assert out.stats["ratio_dev_max"].item() == pytest.approx(0.5)
