"""The PPO learner in one process (world size 1, gloo on CPU), under every ZeRO stage x dtype,
and on FSDP2.

For ZeRO 0/1/2/3 x float32/bfloat16 (DeepSpeed runs bf16 on CPU), and FSDP2 (reshard 2 float32,
3 bf16): set-up loads the checkpoint
with a float32 value head; ``compute_old`` matches a plain transformers forward; one ``train``
call moves the policy with finite metrics and an on-policy first mini-batch; the weight-sync
export equals ``policy_state_dict``; a checkpoint round trip restores weights, value head and
optimiser state. Plus: padded rows and token-budget micro-batches (ZeRO-2), optimiser offload
(ZeRO-2, ZeRO-3) and a separate critic (ZeRO-3).

No Ray: drives ``rlhf_ray.workers.learner.Learner`` through ``tests/inprocess.py``. One learner
per (stage, dtype), shared by the tests of that case; every test reads the weights it compares
against itself, so the tests do not depend on their order. ~25 s on a busy 2-core machine; the
first run on a fresh machine also JIT-builds DeepSpeed's CPU Adam for the offload cases (~1 minute,
cached in ~/.cache/torch_extensions).

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_learner_inprocess.py
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests import inprocess as ip

# DeepSpeed's own calls of renamed torch.distributed functions, once per bucket: noise here.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.distributed\.\w+` is deprecated:FutureWarning")

# (backend, stage, dtype): every DeepSpeed ZeRO stage x dtype, and FSDP2 keeping gathered
# parameters to the backward (2) in float32 and resharding after the forward (3) in bf16.
CASES = [("deepspeed", stage, dtype) for stage in (0, 1, 2, 3) for dtype in ("float32", "bfloat16")] + [
    ("fsdp2", 2, "float32"), ("fsdp2", 3, "bfloat16")]
IDS = [f"zero{s}-{d}" if b == "deepspeed" else f"{b}-{s}-{d}" for b, s, d in CASES]

# fp32 learner vs fp32 plain forward: only summation order differs (trimmed micro-batches,
# response-only LM head); measured <= 1e-6.
FP32_TOL = 1e-4
# bf16 learner vs the fp32 plain forward of the same weights: bf16 keeps 8 significant bits, so
# each activation is rounded by up to 2^-9 relative, through 2 layers and the LM head; measured
# 2.7e-3 (logprobs) and 1.7e-3 (values) on the tiny model. 2e-2 leaves room for other kernels
# while a real bug (off-by-one position, wrong temperature, wrong rows) is off by ~1.
BF16_TOL = 2e-2


def _tol(dtype: str) -> float:
    return FP32_TOL if dtype == "float32" else BF16_TOL


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request, tiny_model):
    """A set-up learner for one (backend, stage, dtype), with its weights right after set-up."""
    backend, stage, dtype = request.param
    learner, info = ip.build_learner(ip.learner_config(tiny_model, zero_stage=stage, dtype=dtype,
                                                       **{"learner.backend": backend}))
    yield SimpleNamespace(learner=learner, info=info, backend=backend, stage=stage, dtype=dtype, model=tiny_model,
                          initial_policy=learner.policy_state_dict(), initial_head=ip.value_head_state(learner))
    ip.release(learner)


def test_setup_loads_the_checkpoint_with_a_float32_value_head(case, checkpoint):
    from rlhf_ray.tiny_models import count_parameters

    hidden = case.initial_head["linear.weight"].shape[1]
    assert case.info["rank"] == 0 and case.info["zero_stage"] == case.stage and case.info["backend"] == case.backend
    assert case.info["parameters"] == count_parameters(case.model) + hidden + 1
    assert ip.value_head_dtypes(case.learner) == {"linear.weight": torch.float32, "linear.bias": torch.float32}
    assert all(t.dtype == torch.float32 for t in case.initial_head.values())
    want = getattr(torch, case.dtype)
    assert {s.dtype for s in case.learner.weight_specs()} == {case.dtype}
    # the policy holds the checkpoint's weights, rounded once to the learner's dtype
    assert list(case.initial_policy) == list(checkpoint)
    for name, t in case.initial_policy.items():
        assert t.dtype == want and torch.equal(t, checkpoint[name].to(want)), name


def test_compute_old_matches_a_plain_transformers_forward(case):
    batch = ip.synthetic_batch()
    logprobs, values = case.learner.compute_old(batch)
    assert logprobs.shape == values.shape == batch.response_mask.shape
    assert values.dtype == torch.float32 and logprobs.dtype == torch.float32
    assert torch.isfinite(values).all() and torch.isfinite(logprobs).all()
    mask = batch.response_mask
    assert (logprobs[~mask] == 0).all() and (values[~mask] == 0).all()
    ref_lp, ref_v = ip.plain_forward(case.model, case.learner.policy_state_dict(), ip.value_head_state(case.learner),
                                     batch, case.learner.spec.temperature, case.learner.device)
    assert float(values.abs().max()) > 1e-3  # a non-zero head, so the comparison means something
    assert float((logprobs - ref_lp).abs().max()) < _tol(case.dtype)
    assert float((values - ref_v).abs().max()) < _tol(case.dtype)


def test_sync_export_equals_policy_state_dict(case, checkpoint):
    buckets, exported = ip.sync_export(case.learner, bucket_bytes=32 * 1024)
    state = case.learner.policy_state_dict()
    assert len(buckets) > 1  # the check crosses bucket boundaries
    assert list(exported) == list(state) == list(checkpoint)  # HF names, module order, no value head
    for bucket in buckets:
        for spec in bucket.specs:
            t = exported[spec.name]
            assert tuple(t.shape) == spec.shape and str(t.dtype) == f"torch.{spec.dtype}", spec
            assert torch.equal(t, state[spec.name]), spec.name


def test_one_update_moves_the_policy_with_finite_metrics(case):
    learner = case.learner
    batch = ip.with_learner_old(learner, ip.synthetic_batch())
    before, head_before = learner.policy_state_dict(), ip.value_head_state(learner)
    metrics = ip.train(learner, batch, iteration=0)
    for key in ("policy_loss", "value_loss", "entropy", "clip_fraction", "grad_norm", "onpolicy_ratio_dev", "lr"):
        assert key in metrics, key
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    assert metrics["grad_norm"] > 0
    assert ip.max_abs_diff(before, learner.policy_state_dict()) > 0
    assert ip.max_abs_diff(head_before, ip.value_head_state(learner)) > 0
    # first micro-batch of the first mini-batch: old logprobs are the learner's own, ratio 1.
    # bf16: compute_old and train trim their (differently composed) batches differently.
    bound = 1e-5 if case.dtype == "float32" else BF16_TOL
    assert metrics["onpolicy_ratio_dev"] < bound, metrics["onpolicy_ratio_dev"]


def test_checkpoint_round_trip_restores_weights_head_and_optimizer(case, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models import load_value_head

    learner = case.learner
    batch = ip.with_learner_old(learner, ip.synthetic_batch())
    ip.train(learner, batch, iteration=1)  # Adam moments and a scheduler step worth restoring
    assert learner.save_checkpoint(str(tmp_path / "ckpt"))
    saved, saved_head = learner.policy_state_dict(), ip.value_head_state(learner)
    # the exported Hugging Face policy and value head are the learner's weights
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt" / "policy"), dtype=torch.float32)
    exported = exported.state_dict()
    assert ip.max_abs_diff(saved, exported) == 0
    assert ip.max_abs_diff(load_value_head(tmp_path / "ckpt" / "policy"), saved_head) == 0

    # optimiser and scheduler state came back too: the same update again gives the same weights
    target, replayed = ip.replay_after_load(learner, batch, str(tmp_path / "ckpt"), saved, saved_head, iteration=2)
    assert ip.max_abs_diff(target, replayed) == 0


# Padded rows instead of packed ones; passes sized by token budgets (40 and 30 tokens: 2-4 of the
# 3-13-token sequences per pass, so the parts differ from the sequence-count split).
@pytest.mark.parametrize("overrides", [{"learner.packing": False},
                                       {"learner.micro_batch_tokens": 40, "learner.forward_max_tokens": 30}],
                         ids=["padded", "token-budgets"])
def test_micro_batching_modes_match_the_plain_forward_and_start_on_policy(tiny_model, overrides):
    learner, _ = ip.build_learner(ip.learner_config(tiny_model, zero_stage=2, **overrides))
    try:
        batch = ip.synthetic_batch()
        logprobs, values = learner.compute_old(batch)
        ref_lp, ref_v = ip.plain_forward(tiny_model, learner.policy_state_dict(), ip.value_head_state(learner),
                                         batch, learner.spec.temperature, learner.device)
        assert float((logprobs - ref_lp).abs().max()) < FP32_TOL
        assert float((values - ref_v).abs().max()) < FP32_TOL
        metrics = ip.train(learner, batch, iteration=0)
        assert metrics["onpolicy_ratio_dev"] < 1e-5 and math.isfinite(metrics["policy_loss"])
    finally:
        ip.release(learner)


@pytest.mark.parametrize("stage", [2, 3])
def test_optimizer_offload_starts_and_trains(tiny_model, stage):
    learner, info = ip.build_learner(ip.learner_config(tiny_model, zero_stage=stage, offload_optimizer=True))
    try:
        assert info["zero_stage"] == stage
        batch = ip.with_learner_old(learner, ip.synthetic_batch())
        before = learner.policy_state_dict()
        metrics = ip.train(learner, batch, iteration=0)
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        assert not bad, f"non-finite metrics: {bad}"
        assert metrics["onpolicy_ratio_dev"] < 1e-5
        assert ip.max_abs_diff(before, learner.policy_state_dict()) > 0
    finally:
        ip.release(learner)


def test_separate_critic_under_zero3_exports_only_the_policy(tiny_model, checkpoint):
    learner, _ = ip.build_learner(ip.learner_config(tiny_model, zero_stage=3, separate_critic=True))
    try:
        _, exported = ip.sync_export(learner, bucket_bytes=32 * 1024)
        assert list(exported) == list(checkpoint)  # neither critic_body.* nor value_head.*
        batch = ip.with_learner_old(learner, ip.synthetic_batch())
        before = learner.policy_state_dict()
        metrics = ip.train(learner, batch, iteration=0)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert metrics["onpolicy_ratio_dev"] < 1e-5
        assert ip.max_abs_diff(before, learner.policy_state_dict()) > 0
    finally:
        ip.release(learner)


@pytest.mark.parametrize("packing", [True, False])
def test_a_step_whose_samples_were_all_quarantined_is_skipped(tiny_model, packing):
    # One usable sample in 8: one mini-batch of 4 has no valid token (skipped, counted), and in the
    # other a micro-batch of 2 may have none (an empty packed row): the update still runs.
    learner, _ = ip.build_learner(ip.learner_config(tiny_model, zero_stage=2, **{"learner.packing": packing}))
    try:
        from rlhf_ray.batch import TrainUpdate

        batch = ip.synthetic_batch()
        keep = torch.zeros(len(batch), dtype=torch.bool)
        keep[0] = True
        mask = batch.response_mask & keep[:, None]
        learner.compute_old(batch)
        before = learner.policy_state_dict()
        metrics = learner.train(TrainUpdate(batch.advantages * mask, batch.returns * mask, mask), iteration=0)
        assert metrics["skipped_steps"] == 1.0
        assert all(math.isfinite(v) for k, v in metrics.items() if k != "grad_norm"), metrics
        assert ip.max_abs_diff(before, learner.policy_state_dict()) > 0
    finally:
        ip.release(learner)


# --------------------------------------------------------------------------- the PPO family in the learner


@pytest.mark.parametrize("overrides", [
    {"ppo.estimator": "grpo", "rollout.samples_per_prompt": 2, "rollout.prompts_per_iteration": 4},
    {"ppo.kl_in": "loss", "ppo.kl_estimator": "k3", "ppo.loss_agg": "seq_mean_token_mean"},
    {"ppo.ratio": "sequence", "ppo.loss_agg": "seq_mean_token_mean"},
    {"ppo.rollout_correction": "tis"},
    {"ppo.rollout_correction": "icepop"},
], ids=["grpo-critic-free", "kl-loss-seq-mean", "gspo", "tis", "icepop"])
def test_family_modes_train_and_start_on_policy(tiny_model, overrides):
    from rlhf_ray.batch import TrainUpdate

    learner, info = ip.build_learner(ip.learner_config(tiny_model, zero_stage=2, **overrides))
    try:
        batch = ip.synthetic_batch()
        batch = batch.replace(rollout_logprobs=ip.with_learner_old(learner, batch).old_logprobs - 0.01)
        old_lp, _ = learner.compute_old(batch)
        before = learner.policy_state_dict()
        kl_coef = 0.1 if overrides.get("ppo.kl_in") == "loss" else 0.0
        metrics = learner.train(TrainUpdate.of(batch, with_ref=kl_coef > 0, kl_coef=kl_coef), iteration=0)
        assert metrics["onpolicy_ratio_dev"] < 1e-5 and math.isfinite(metrics["policy_loss"])
        assert ip.max_abs_diff(before, learner.policy_state_dict()) > 0
        critic_free = overrides.get("ppo.estimator") == "grpo"
        assert (learner.head is None) == critic_free
        assert ("value_loss" in metrics) != critic_free and ("value_head_grad_norm" in metrics) != critic_free
        assert info["parameters"] == sum(t.numel() for t in before.values()) + (0 if critic_free else 65)
        if critic_free:
            _, values = learner.compute_old(batch)
            assert torch.equal(values, torch.zeros_like(values))
        if "ppo.rollout_correction" in overrides:
            # engine logprobs 0.01 below the learner's: w = exp(0.01) on every token
            assert metrics["correction/weight_mean"] == pytest.approx(math.exp(0.01), rel=1e-4)
        if "ppo.kl_in" in overrides:
            assert "kl_loss" in metrics
    finally:
        ip.release(learner)


def test_critic_free_checkpoint_has_no_value_head(tiny_model, tmp_path):
    learner, _ = ip.build_learner(ip.learner_config(tiny_model, zero_stage=2, **{
        "ppo.estimator": "rloo", "rollout.samples_per_prompt": 2, "rollout.prompts_per_iteration": 4}))
    try:
        ip.train(learner, ip.synthetic_batch(), iteration=0)
        learner.save_checkpoint(str(tmp_path / "ck"))
        assert not (tmp_path / "ck" / "policy" / "value_head.safetensors").exists()
        assert (tmp_path / "ck" / "policy" / "config.json").exists()
        learner.load_checkpoint(str(tmp_path / "ck"))
    finally:
        ip.release(learner)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_non_finite_gradient_step_is_skipped_on_every_stage(tiny_model, stage):
    # fp32 ZeRO-0 used to apply it (DeepSpeed clips there but does not check); ZeRO-1/2/3 skip it.
    from rlhf_ray.batch import TrainUpdate

    learner, _ = ip.build_learner(ip.learner_config(tiny_model, zero_stage=stage, mini_batches=1, micro_batch_size=8))
    try:
        batch = ip.synthetic_batch()
        learner.compute_old(batch)
        before, head_before = learner.policy_state_dict(), ip.value_head_state(learner)
        nan_adv = torch.where(batch.response_mask, torch.full_like(batch.advantages, float("nan")), 0.0)
        metrics = learner.train(TrainUpdate(nan_adv, batch.returns, batch.response_mask), iteration=0)
        assert metrics["nonfinite_steps"] == 1.0
        assert ip.max_abs_diff(before, learner.policy_state_dict()) == 0.0
        assert ip.max_abs_diff(head_before, ip.value_head_state(learner)) == 0.0
        # and the next finite update trains normally
        metrics = ip.train(learner, batch, iteration=1)
        assert metrics["nonfinite_steps"] == 0.0 and ip.max_abs_diff(before, learner.policy_state_dict()) > 0
    finally:
        ip.release(learner)


def test_packing_is_checked_against_the_padded_forward_at_set_up(tiny_model):
    """learner.packing with an attention that lets packed sequences see each other stops at
    set-up with the fix; one that keeps them apart (through the varlen boundaries) passes."""
    varlen, leaky = ip.register_test_attentions()
    learner, info = ip.build_learner(ip.learner_config(tiny_model, zero_stage=2, **{"model.attn_implementation": varlen}))
    assert info["packing_gap"] is not None and info["packing_gap"] < 1e-4
    ip.release(learner)
    with pytest.raises(RuntimeError, match="packed sequences see each other.*--learner.packing false"):
        ip.build_learner(ip.learner_config(tiny_model, zero_stage=2, **{"model.attn_implementation": leaky}))
    learner, info = ip.build_learner(ip.learner_config(tiny_model, zero_stage=2, **{
        "model.attn_implementation": leaky, "learner.packing": False}))
    assert info["packing_gap"] is None
    ip.release(learner)


# --------------------------------------------------------------------------- multi-turn episodes


@pytest.mark.parametrize("overrides", [{}, {"learner.packing": False, "model.lora.rank": 4, "model.lora.alpha": 8}],
                         ids=["full-packed", "lora-padded"])
def test_observation_tokens_get_no_loss(tiny_model, overrides):
    """An episode's observation tokens are context: the update's mask (the loss mask) leaves them
    out, so whatever advantages, returns and old values sit there must not change the update. Two
    learners from the same checkpoint train on the same batch, the second with garbage (+-100) at
    the observations; their weights and value heads must come out equal."""
    from rlhf_ray.batch import TrainUpdate

    batch = ip.synthetic_batch()
    observation = batch.response_mask.clone()
    observation[:, [0, 3, 4, 5]] = False  # tokens 1 and 2 of each response of 3+ tokens are an observation
    loss_mask = batch.response_mask & ~observation
    results = []
    for garbage in (0.0, 100.0):
        learner, _ = ip.build_learner(ip.learner_config(tiny_model, zero_stage=2, **overrides))
        try:
            learner.compute_old(batch.replace(old_values=batch.old_values + garbage * observation))
            update = TrainUpdate(batch.advantages * loss_mask + garbage * observation,
                                 batch.returns * loss_mask - garbage * observation, loss_mask)
            metrics = learner.train(update, iteration=0)
            results.append((learner.policy_state_dict(), ip.value_head_state(learner), metrics))
        finally:
            ip.release(learner)
    (policy_a, head_a, m_a), (policy_b, head_b, m_b) = results
    assert ip.max_abs_diff(policy_a, policy_b) < 1e-6 and ip.max_abs_diff(head_a, head_b) < 1e-6
    assert m_a["value_loss"] == pytest.approx(m_b["value_loss"], rel=1e-5)
    assert m_a["policy_loss"] == pytest.approx(m_b["policy_loss"], rel=1e-5, abs=1e-7)
