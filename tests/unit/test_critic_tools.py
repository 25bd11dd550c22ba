"""Critic warm-up (ppo.critic_warmup_iterations) and critic epochs (ppo.critic_epochs).

In-process learners (world size 1, no Ray, ``tests/inprocess.py``): a warm-up iteration trains the
value head (shared body) or the critic body and head (separate critic) and leaves every policy
weight bit-identical, under DeepSpeed ZeRO-0/2/3 and FSDP2, with LoRA too; the policy's Adam state
and step counts come through a separate-critic warm-up untouched (the next PPO step equals one
taken without the warm-up); the policy's learning-rate schedule does not advance in a shared-body
warm-up; critic epochs change the policy only as ``ppo.critic_epochs`` documents. The coordinator
(fakes of ``tests/unit/test_coordinator.py``): warm-up iterations send value-only updates, no
weight sync follows them, the KL stays 0 and the KL controller does not adapt; a resume inside
the warm-up goes on warming up. Validation refuses the bad settings before Ray starts.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_critic_tools.py
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.batch import TrainUpdate
from rlhf_ray.config import ConfigError, ModelConfig, PPOConfig, load_config
from tests import inprocess as ip
from tests.unit.test_coordinator import FakeLearners, FakeReference, FakeSync, _config, _coordinator

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.distributed\.\w+` is deprecated:FutureWarning")

POLICY_METRICS = ("policy_loss", "clip_fraction", "policy_kl", "entropy", "onpolicy_ratio_dev")


def _engine_state(learner) -> dict[str, torch.Tensor]:
    """Every parameter the engine holds (policy.*, critic_body.*; LoRA adapters and frozen base
    weights alike), gathered whole, under the actor-critic's names."""
    from rlhf_ray.backends.engine import gather_full_state_dict

    return gather_full_state_dict(learner.engine, list(learner.engine.module.named_parameters()), keep=True)


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a and set(a) == set(b)
    return all(torch.equal(a[k], b[k]) for k in a)


def _learner(tiny_model, backend="deepspeed", stage=2, dtype="float32", separate_critic=False, **overrides):
    cfg = ip.learner_config(tiny_model, zero_stage=stage, dtype=dtype, separate_critic=separate_critic,
                            **{"learner.backend": backend, **overrides})
    return ip.build_learner(cfg)[0]


def _iteration(learner, batch, iteration: int, value_only: bool = False) -> dict[str, float]:
    learner.compute_old(batch)
    return learner.train(TrainUpdate.of(batch, value_only=value_only), iteration)


# Weight decay 50: an optimiser step with zero gradients would shrink the weights it holds by
# lr x 50 = 1.25% at the first step (lr 1e-3 / 4), more than a bf16 weight's rounding (2^-9), so a
# policy that merely gets no gradient (instead of no step) would not stay bit-identical in bf16 either.
# learner.warmup_steps 4: lr() after k steps of the schedule is (k + 1) / 4 x learner.lr.
HOLD = {"learner.weight_decay": 50.0, "learner.warmup_steps": 4, "ppo.critic_warmup_iterations": 2}

WARMUP_CASES = [("deepspeed", 2, "float32"), ("deepspeed", 3, "bfloat16"), ("deepspeed", 0, "bfloat16"),
                ("fsdp2", 2, "float32")]
WARMUP_IDS = [f"{b}-{s}-{d}" for b, s, d in WARMUP_CASES]
# ZeRO-2 with the optimiser state offloaded: DeepSpeed's CPU Adam (built on first use, ~1 minute, then cached).
OFFLOAD = ("deepspeed", 2, "float32", {"learner.offload_optimizer": True})


@pytest.mark.parametrize("backend,stage,dtype", WARMUP_CASES, ids=WARMUP_IDS)
def test_shared_body_warmup_trains_the_head_alone_and_leaves_the_policy_bit_identical(tiny_model, backend, stage,
                                                                                      dtype):
    learner = _learner(tiny_model, backend, stage, dtype, **HOLD)
    try:
        batch = ip.synthetic_batch()
        engine0, head0, lr0 = _engine_state(learner), ip.value_head_state(learner), learner.engine.lr()
        old0, _ = learner.compute_old(batch)
        for it in range(2):
            m = _iteration(learner, batch, it, value_only=True)
            assert math.isfinite(m["value_loss"]) and m["value_head_grad_norm"] > 0
            assert not set(POLICY_METRICS) & set(m), m  # no policy loss was computed
            assert "grad_norm" not in m  # the engine took no step
        assert _identical(engine0, _engine_state(learner))
        assert ip.max_abs_diff(head0, ip.value_head_state(learner)) > 0
        old1, _ = learner.compute_old(batch)
        assert torch.equal(old0, old1)  # the same policy: its KL to where it started is exactly 0
        # The engine took no step: the policy's schedule is where it started (1/4 of learner.lr);
        # the first PPO iteration's 2 steps (2 mini-batches) run at 1/4 and 2/4, leaving 3/4.
        assert learner.engine.lr() == lr0 == pytest.approx(1e-3 / 4)
        m = _iteration(learner, batch, 2)
        assert m["lr"] == pytest.approx(1e-3 * 3 / 4) and "policy_loss" in m
        assert not _identical(engine0, _engine_state(learner))
    finally:
        ip.release(learner)


@pytest.mark.parametrize("backend,stage,dtype,extra", [(*case, {}) for case in WARMUP_CASES] + [OFFLOAD],
                         ids=[*WARMUP_IDS, "deepspeed-2-float32-offload"])
def test_separate_critic_warmup_trains_the_critic_and_holds_the_policy(tiny_model, backend, stage, dtype, extra):
    learner = _learner(tiny_model, backend, stage, dtype, separate_critic=True, **HOLD, **extra)
    try:
        batch = ip.synthetic_batch()
        engine0, head0 = _engine_state(learner), ip.value_head_state(learner)
        for it in range(2):
            m = _iteration(learner, batch, it, value_only=True)
            assert not set(POLICY_METRICS) & set(m) and m["grad_norm"] > 0, m
        engine1 = _engine_state(learner)
        assert _identical(_part(engine0, "policy."), _part(engine1, "policy."))
        assert not _identical(_part(engine0, "critic_body."), _part(engine1, "critic_body."))
        assert ip.max_abs_diff(head0, ip.value_head_state(learner)) > 0
        m = _iteration(learner, batch, 2)
        assert "policy_loss" in m
        assert not _identical(_part(engine1, "policy."), _part(_engine_state(learner), "policy."))
    finally:
        ip.release(learner)


def test_separate_critic_warmup_leaves_the_policys_optimiser_state_as_it_was(tiny_model):
    # A policy step after two warm-up iterations equals the same step without them: with a
    # separate critic the policy's gradient does not depend on the critic, so only optimiser state
    # moved during the warm-up (Adam moments, step counts and their bias correction, weight
    # decay) could make them differ. Constant schedule and no clipping: the two share one schedule,
    # and the clip norm would count the critic's (different) gradient.
    same = {"learner.weight_decay": 0.1, "learner.max_grad_norm": 0.0, "ppo.critic_warmup_iterations": 2}
    batch = ip.synthetic_batch()
    after = []
    for warmups in (2, 0):
        learner = _learner(tiny_model, separate_critic=True, **same)
        try:
            for it in range(warmups):
                _iteration(learner, batch, it, value_only=True)
            _iteration(learner, batch, 2)
            _iteration(learner, batch, 3)
            after.append(_part(_engine_state(learner), "policy."))
        finally:
            ip.release(learner)
    assert _identical(*after)


def test_a_checkpoint_taken_in_a_separate_critic_warmup_resumes_exactly(tiny_model, tmp_path):
    # The policy's parameter group has no optimiser state yet (every step so far held it).
    learner = _learner(tiny_model, separate_critic=True, **HOLD)
    try:
        batch = ip.with_learner_old(learner, ip.synthetic_batch())
        _iteration(learner, batch, 0, value_only=True)
        assert learner.save_checkpoint(str(tmp_path / "ckpt"))
        saved, saved_head = learner.policy_state_dict(), ip.value_head_state(learner)
        target, replayed = ip.replay_after_load(learner, batch, str(tmp_path / "ckpt"), saved, saved_head, iteration=1)
        assert ip.max_abs_diff(target, replayed) == 0
    finally:
        ip.release(learner)


def test_lora_warmup_keeps_the_adapters_and_the_base_unchanged(tiny_model):
    learner = _learner(tiny_model, **HOLD, **{"model.lora.rank": 4, "model.lora.alpha": 8})
    try:
        batch = ip.synthetic_batch()
        engine0, head0 = _engine_state(learner), ip.value_head_state(learner)
        assert any(".lora_A." in k for k in engine0)
        _iteration(learner, batch, 0, value_only=True)
        assert _identical(engine0, _engine_state(learner))
        assert ip.max_abs_diff(head0, ip.value_head_state(learner)) > 0
    finally:
        ip.release(learner)


def _two_groups(optimizer: str = "adamw"):
    from rlhf_ray.backends.engine import make_torch_optimizer
    from rlhf_ray.config import LearnerConfig

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    lrn = LearnerConfig(optimizer=optimizer, lr=0.1, weight_decay=0.5)
    opt = make_torch_optimizer([{"params": [a], "name": "policy"}, {"params": [b], "name": "critic"}], lrn,
                               fused=False)
    return a, b, opt


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_held_groups_leave_a_group_and_its_state_as_they_were(optimizer):
    from rlhf_ray.backends.engine import held_groups

    a, b, opt = _two_groups(optimizer)
    for p in (a, b):
        p.grad = torch.full_like(p, 0.3)
    opt.step()  # a first step, so the held group has state (AdamW: moments, a step count) to keep
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[a].items()}
    a_before, b_before = a.detach().clone(), b.detach().clone()
    with held_groups(opt, ("policy",)):
        opt.step()  # gradients still set on both
        assert [len(g["params"]) for g in opt.param_groups] == [1, 1]  # emptied only during the step
    assert torch.equal(a, a_before) and not torch.equal(b, b_before)
    assert opt.state[a].keys() == state.keys()
    kept = opt.state[a]
    assert all(torch.equal(kept[k], v) if torch.is_tensor(v) else kept[k] == v for k, v in state.items())
    assert "step" not in vars(opt)  # the optimiser's own step is back
    opt.step()
    assert not torch.equal(a, a_before)


def test_held_groups_follow_a_wrapper_that_steps_group_by_group():
    # DeepSpeed's ZeRO-1/2 step swaps the optimiser's group list for one group at a time and steps.
    from rlhf_ray.backends.engine import held_groups

    a, b, opt = _two_groups()
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    a_before, b_before = a.detach().clone(), b.detach().clone()
    groups = opt.param_groups
    with held_groups(opt, ("policy",)):
        for g in groups:
            opt.param_groups = [g]
            opt.step()
        opt.param_groups = groups
    assert torch.equal(a, a_before) and a not in opt.state and not torch.equal(b, b_before)


# --------------------------------------------------------------------------- critic epochs


@pytest.mark.parametrize("variant,policy_moves", [
    ({"model.value_grad_to_body": False}, False),
    ({"model.separate_critic": True}, False),
    ({}, True),
], ids=["head-only", "separate-critic", "shared-body"])
def test_critic_epochs_change_the_policy_only_as_documented(tiny_model, variant, policy_moves):
    # The same iteration with and without 2 critic epochs: the value head always ends elsewhere;
    # the policy ends bit-identical with the value gradient kept out of the body or a separate
    # critic, and elsewhere with the shared body trained on the value loss (the default).
    batch = ip.synthetic_batch()
    runs = []
    for epochs in (2, 0):
        learner = _learner(tiny_model, **{"learner.weight_decay": 0.1, "ppo.critic_epochs": epochs, **variant})
        try:
            m = _iteration(learner, batch, 0)
            runs.append((m, _engine_state(learner), ip.value_head_state(learner)))
        finally:
            ip.release(learner)
    (with_epochs, engine_a, head_a), (without, engine_b, head_b) = runs
    assert ip.max_abs_diff(head_a, head_b) > 0
    assert _identical(_part(engine_a, "policy."), _part(engine_b, "policy.")) != policy_moves
    if "model.separate_critic" in variant:
        assert not _identical(_part(engine_a, "critic_body."), _part(engine_b, "critic_body."))
    # The PPO epochs report as before; the critic epochs under their own prefix.
    assert with_epochs["policy_loss"] == without["policy_loss"]
    assert math.isfinite(with_epochs["critic_epochs/value_loss"]) and "critic_epochs/value_loss" not in without
    assert ("critic_epochs/grad_norm" in with_epochs) == (variant.get("model.value_grad_to_body", True))


def test_engine_and_head_schedules_count_the_steps_each_takes():
    # 10 iterations, 2 of them warm-up, 1 PPO epoch + 1 critic epoch of 2 mini-batches.
    from rlhf_ray.workers.learner import optimizer_steps

    p = PPOConfig(iterations=10, epochs=1, mini_batches=2, critic_warmup_iterations=2, critic_epochs=1)
    # shared body, value gradient into it: no engine step in the warm-up, 2 + 2 per later iteration
    assert optimizer_steps(p, ModelConfig()) == (8 * 4, 10 * 4)
    # head-only value training: the engine steps in the PPO epochs alone
    assert optimizer_steps(p, ModelConfig(value_grad_to_body=False)) == (8 * 2, 10 * 4)
    # separate critic: its body steps in every value epoch, warm-up included
    assert optimizer_steps(p, ModelConfig(separate_critic=True)) == (10 * 4, 10 * 4)
    # the defaults keep the old horizon: iterations x epochs x mini-batches for both
    assert optimizer_steps(PPOConfig(iterations=10, epochs=3, mini_batches=2), ModelConfig()) == (60, 60)


# --------------------------------------------------------------------------- the coordinator


class DriftingLearners(FakeLearners):
    """A policy that moves by 0.1 nats per token with every update that trains it: old logprobs
    are the engine's (the reference's, with FakeReference(gap=0)) plus 0.1 x those updates."""

    def __init__(self) -> None:
        super().__init__()
        self.updates = 0

    def compute_old(self, batch):
        self.offset = 0.1 * self.updates
        return super().compute_old(batch)

    def train(self, batch, iteration):
        self.updates += not batch.value_only
        return super().train(batch, iteration)


def _warmup_config(**ppo):
    return _config(ppo={"critic_warmup_iterations": 2, "kl_target": 0.01, "kl_horizon": 10, **ppo})


def test_warmup_iterations_train_the_value_alone_without_a_sync():
    learners, sync = DriftingLearners(), FakeSync()
    coord = _coordinator(_warmup_config(), learners=learners, weight_sync=sync, reference=FakeReference(gap=0.0))
    metrics = [coord.step() for _ in range(4)]
    assert [u.value_only for u, _ in learners.train_calls] == [True, True, False, False]
    assert [m["critic_warmup"] for m in metrics] == [1.0, 1.0, 0.0, 0.0]
    # No sync after a warm-up iteration; the first PPO update (iteration 2) is synced before iteration 3.
    assert [("sync_bytes" in m) for m in metrics] == [False, False, False, True] and sync.calls == 1
    # The policy did not move in the warm-up: its KL to the reference is 0 until the first update.
    assert [m["kl_mean"] for m in metrics[:3]] == [0.0, 0.0, 0.0] and metrics[3]["kl_mean"] > 0
    # ... and the adaptive KL controller did not adapt to a KL the warm-up cannot move.
    assert [m["kl_coef"] for m in metrics[:3]] == [pytest.approx(0.02)] * 3


def test_a_run_resumed_inside_the_warmup_goes_on_warming_up():
    cfg = _warmup_config(critic_warmup_iterations=3)
    original = _coordinator(cfg)
    original.step()
    state = original.state_dict()
    learners, sync = FakeLearners(), FakeSync()
    resumed = _coordinator(cfg, learners=learners, weight_sync=sync)
    resumed.load_state_dict(state)
    resumed.mark_weights_stale()  # as a resume does: the engines get the checkpoint's weights first
    metrics = [resumed.step() for _ in range(3)]
    assert [it for _, it in learners.train_calls] == [1, 2, 3]
    assert [u.value_only for u, _ in learners.train_calls] == [True, True, False]
    assert [m["critic_warmup"] for m in metrics] == [1.0, 1.0, 0.0]
    assert sync.calls == 1  # the resume's own sync; none after the warm-up iterations


def test_no_warmup_metric_and_full_updates_by_default():
    learners = FakeLearners()
    m = _coordinator(learners=learners).step()
    assert "critic_warmup" not in m and learners.train_calls[0][0].value_only is False


def test_train_update_split_keeps_value_only():
    batch = ip.synthetic_batch()
    parts = TrainUpdate.of(batch, value_only=True).split(2)
    assert [u.value_only for u in parts] == [True, True]
    assert [u.value_only for u in TrainUpdate.of(batch).split(2)] == [False, False]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("ppo,message", [
    ({"critic_warmup_iterations": -1}, r"--ppo.critic_warmup_iterations must be >= 0 \(got -1\)"),
    ({"critic_epochs": -2}, r"--ppo.critic_epochs must be >= 0 \(got -2\)"),
    ({"critic_warmup_iterations": 2, "estimator": "grpo"}, r"critic_warmup_iterations 2 trains the critic, but "
                                                           r"--ppo.estimator grpo trains no value network"),
    ({"critic_epochs": 1, "estimator": "rloo"}, r"--ppo.critic_epochs 1 trains the critic, but --ppo.estimator rloo"),
    ({"critic_warmup_iterations": 5, "iterations": 5}, r"the policy would never be trained"),
])
def test_bad_critic_tool_settings_are_refused_before_ray_starts(ppo, message):
    rollout = {"rollout.samples_per_prompt": 2} if ppo.get("estimator") in ("grpo", "rloo") else {}
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**{f"ppo.{k}": v for k, v in ppo.items()}, **rollout})


def test_critic_tools_with_gae_are_accepted():
    cfg = load_config(None, {"ppo.critic_warmup_iterations": 3, "ppo.critic_epochs": 2, "ppo.iterations": 4,
                             "model.separate_critic": True})
    assert (cfg.ppo.critic_warmup_iterations, cfg.ppo.critic_epochs) == (3, 2)
