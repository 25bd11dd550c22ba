"""The PPO learner on CUDA in one process (world size 1 over NCCL): ZeRO-2 and ZeRO-3 in bf16.

The checks of ``tests/unit/test_learner_inprocess.py``, on a GPU: set-up loads the checkpoint
with a float32 value head; ``compute_old`` matches a plain fp32 transformers forward; one update
moves the policy with finite metrics and an on-policy first mini-batch; the weight-sync export
equals ``policy_state_dict``; a checkpoint round trip restores weights and value head; ZeRO-3
with optimiser offload starts and trains.

Marked ``gpu``; skipped without CUDA, and without DeepSpeed (the GPU image has none: see
scripts/gpu_check.sh, which installs it from wheels). Nothing here imports Ray or vLLM, so it
collects on a machine without them.

Run: python -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_learner_gpu.py
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests import inprocess as ip

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings(r"ignore:`torch\.distributed\.\w+` is deprecated:FutureWarning")]

STAGES = (2, 3)
# bf16 learner vs the fp32 plain forward of the same weights (same reasoning as the CPU test:
# 8 significant bits per rounded activation; tensor cores accumulate in fp32); a real bug is ~1.
BF16_TOL = 2e-2
# Replaying an update after load_checkpoint: CUDA's embedding backward sums with atomics, so the
# replayed gradients may differ in the last bits and flip the bf16 rounding of a few weights by
# one ulp (~1e-4). A restore that lost the weights would be off by ~lr = 1e-3 nearly everywhere.
REPLAY_MEAN_TOL = 1e-5


@pytest.fixture(scope="module", params=STAGES, ids=[f"zero{s}-bfloat16" for s in STAGES])
def case(request, tiny_model):
    pytest.importorskip("deepspeed")
    learner, info = ip.build_learner(ip.learner_config(tiny_model, zero_stage=request.param, dtype="bfloat16"))
    yield SimpleNamespace(learner=learner, info=info, stage=request.param, model=tiny_model,
                          initial_policy=learner.policy_state_dict(), initial_head=ip.value_head_state(learner))
    ip.release(learner)


def test_setup_on_cuda_loads_the_checkpoint_with_a_float32_value_head(case, checkpoint):
    assert case.learner.device.type == "cuda"
    assert case.info["zero_stage"] == case.stage
    assert ip.value_head_dtypes(case.learner) == {"linear.weight": torch.float32, "linear.bias": torch.float32}
    assert {s.dtype for s in case.learner.weight_specs()} == {"bfloat16"}
    assert list(case.initial_policy) == list(checkpoint)
    for name, t in case.initial_policy.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, checkpoint[name].bfloat16()), name


def test_compute_old_matches_a_plain_transformers_forward(case):
    batch = ip.synthetic_batch()
    logprobs, values = case.learner.compute_old(batch)
    assert values.dtype == torch.float32 and torch.isfinite(values).all() and torch.isfinite(logprobs).all()
    mask = batch.response_mask
    assert (logprobs[~mask] == 0).all() and (values[~mask] == 0).all()
    ref_lp, ref_v = ip.plain_forward(case.model, case.learner.policy_state_dict(), ip.value_head_state(case.learner),
                                     batch, case.learner.spec.temperature, case.learner.device)
    assert float((logprobs - ref_lp).abs().max()) < BF16_TOL
    assert float((values - ref_v).abs().max()) < BF16_TOL


def test_sync_export_equals_policy_state_dict(case, checkpoint):
    buckets, exported = ip.sync_export(case.learner, bucket_bytes=32 * 1024)
    state = case.learner.policy_state_dict()
    assert len(buckets) > 1
    assert list(exported) == list(state) == list(checkpoint)
    for bucket in buckets:
        for spec in bucket.specs:
            t = exported[spec.name]
            assert tuple(t.shape) == spec.shape and t.dtype == torch.bfloat16, spec
            assert torch.equal(t, state[spec.name]), spec.name


def test_one_update_moves_the_policy_with_finite_metrics(case):
    learner = case.learner
    batch = ip.with_learner_old(learner, ip.synthetic_batch())
    before, head_before = learner.policy_state_dict(), ip.value_head_state(learner)
    metrics = ip.train(learner, batch, iteration=0)
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    assert metrics["grad_norm"] > 0
    assert metrics["onpolicy_ratio_dev"] < BF16_TOL, metrics["onpolicy_ratio_dev"]
    assert ip.max_abs_diff(before, learner.policy_state_dict()) > 0
    assert ip.max_abs_diff(head_before, ip.value_head_state(learner)) > 0


def test_checkpoint_round_trip_restores_weights_and_head(case, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models import load_value_head

    learner = case.learner
    batch = ip.with_learner_old(learner, ip.synthetic_batch())
    ip.train(learner, batch, iteration=1)
    assert learner.save_checkpoint(str(tmp_path / "ckpt"))
    saved, saved_head = learner.policy_state_dict(), ip.value_head_state(learner)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt" / "policy"), dtype=torch.float32)
    exported = exported.state_dict()
    assert ip.max_abs_diff(saved, exported) == 0
    assert ip.max_abs_diff(load_value_head(tmp_path / "ckpt" / "policy"), saved_head) == 0

    target, replayed = ip.replay_after_load(learner, batch, str(tmp_path / "ckpt"), saved, saved_head, iteration=2)
    assert ip.mean_abs_diff(target, replayed) < REPLAY_MEAN_TOL


def test_zero3_with_optimizer_offload_starts_and_trains(tiny_model):
    pytest.importorskip("deepspeed")
    cfg = ip.learner_config(tiny_model, zero_stage=3, dtype="bfloat16", offload_optimizer=True)
    learner, _ = ip.build_learner(cfg)
    try:
        batch = ip.with_learner_old(learner, ip.synthetic_batch())
        before = learner.policy_state_dict()
        metrics = ip.train(learner, batch, iteration=0)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert ip.max_abs_diff(before, learner.policy_state_dict()) > 0
    finally:
        ip.release(learner)
