"""Learning-rate schedule: warm-up, then constant / linear / cosine decay, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.backends.engine import lr_multiplier, lr_scheduler
from rlhf_ray.config import ConfigError, LearnerConfig, load_config


def test_warmup_then_constant():
    assert [lr_multiplier(s, 4, 10, "constant", 0.1) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(0, 0, 10, "constant", 0.1) == 1.0


def test_linear_decay_by_hand():
    # warm-up 2 of 6 steps: progress (step - 2) / 4
    got = [lr_multiplier(s, 2, 6, "linear", 0.0) for s in range(8)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert lr_multiplier(4, 2, 6, "linear", 0.2) == pytest.approx(1 - 0.8 * 0.5)


def test_cosine_decay_by_hand():
    # warm-up 1 of 6: progress 0, .2, .4, .6, .8, 1 at steps 1..6; 0.1 + 0.45 (1 + cos(pi p))
    got = [lr_multiplier(s, 1, 6, "cosine", 0.1) for s in range(8)]
    expected = [1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(0.2 * math.pi)), 0.1 + 0.45 * (1 + math.cos(0.4 * math.pi)),
                0.1 + 0.45 * (1 + math.cos(0.6 * math.pi)), 0.1 + 0.45 * (1 + math.cos(0.8 * math.pi)), 0.1, 0.1]
    assert got == pytest.approx(expected)
    assert got[2] == pytest.approx(0.914058, abs=1e-6) and got[4] == pytest.approx(0.410942, abs=1e-6)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_multiplier(3, 1, 6, "step", 0.1)


def test_scheduler_steps_the_optimiser_lr():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.5)
    sched = lr_scheduler(opt, LearnerConfig(lr=0.5, warmup_steps=1, lr_schedule="linear", min_lr_ratio=0.0), 3)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])  # the lr this optimiser step uses
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5, 0.5, 0.25, 0.0])


def test_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match="lr_schedule is 'step'"):
        load_config(None, {"learner.lr_schedule": "step"})
    with pytest.raises(ConfigError, match="min_lr_ratio in \\[0, 1\\]"):
        load_config(None, {"learner.min_lr_ratio": "1.5"})
