"""LoRA on the shared-body actor-critic, one learner rank in process (no Ray), ZeRO-2 and ZeRO-3
(float32, and bf16 for the dtype-sensitive parts).

Checks: only the adapters and the value head train; the reference computed with the adapters off
equals a plain transformers forward of the base checkpoint, after training moved the adapters;
compute_old matches a plain forward of the merged export; the first on-policy ratio is 1; the
weight sync sends exactly the adapted layers, merged, and its bytes are theirs; a checkpoint
round trip restores adapters, value head and optimiser exactly (the replayed update is
bit-identical); the checkpoint's HF policy is the merged model and its adapter directory loads
with PEFT onto the base model to the same logits.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_lora_learner.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests import inprocess as ip

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.distributed\.\w+` is deprecated:FutureWarning")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOL = 1e-4  # fp32 learner vs fp32 plain forward: summation order only (see test_learner_inprocess)


@pytest.fixture(scope="module", params=[("deepspeed", 2), ("deepspeed", 3), ("fsdp2", 3)],
                ids=["zero2", "zero3", "fsdp2"])
def case(request, tiny_model):
    # lr 1e-2: one step visibly moves the (B = 0) adapters away from the base model.
    backend, stage = request.param
    cfg = ip.learner_config(tiny_model, zero_stage=stage, **{"model.lora.rank": 4, "model.lora.alpha": 8,
                                                             "learner.lr": 1e-2, "learner.backend": backend})
    learner, info = ip.build_learner(cfg)
    yield SimpleNamespace(learner=learner, info=info, stage=stage, model=tiny_model)
    ip.release(learner)


def _adapted(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in TARGETS


def test_only_adapters_and_head_train(case):
    from rlhf_ray.tiny_models import count_parameters

    hidden = ip.value_head_state(case.learner)["linear.weight"].shape[1]
    trainable = case.info["trainable_parameters"] - hidden - 1
    assert 0 < trainable < count_parameters(case.model) / 5
    trained = {n for n, p in case.learner.engine.module.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)


def test_sync_sends_exactly_the_adapted_layers_merged(case, checkpoint):
    learner = case.learner
    ip.train(learner, ip.with_learner_old(learner, ip.synthetic_batch()), iteration=0)
    buckets, exported = ip.sync_export(learner, bucket_bytes=32 * 1024)
    full = learner.policy_state_dict()
    assert list(full) == list(checkpoint)  # the merged export has the checkpoint's names and nothing else
    adapted = {n for n in checkpoint if _adapted(n)}
    assert set(exported) == adapted
    assert sum(b.nbytes for b in buckets) == sum(checkpoint[n].numel() * checkpoint[n].element_size() for n in adapted)
    for name in adapted:
        assert torch.equal(exported[name], full[name]), name
        assert float((exported[name] - checkpoint[name]).abs().max()) > 0, name  # merged: W + s B A moved
    for name in set(checkpoint) - adapted:  # frozen tensors stay the checkpoint's
        assert torch.equal(full[name], checkpoint[name]), name


def test_reference_is_the_base_model_and_the_first_ratio_is_one(case, checkpoint):
    learner = case.learner
    batch = ip.synthetic_batch(seed=1)
    ip.train(learner, ip.with_learner_old(learner, batch), iteration=1)  # adapters are not zero any more
    temperature = learner.spec.temperature
    base_lp, _ = ip.plain_forward(case.model, checkpoint, ip.value_head_state(learner), batch, temperature, "cpu")
    ref = learner.reference_logprobs(batch, temperature)
    assert float((ref - base_lp).abs().max()) < TOL
    old_lp, old_v = learner.compute_old(batch)
    lp, v = ip.plain_forward(case.model, learner.policy_state_dict(), ip.value_head_state(learner), batch,
                             temperature, "cpu")
    assert float((old_lp - lp).abs().max()) < TOL and float((old_v - v).abs().max()) < TOL
    assert float((old_lp - base_lp).abs().max()) > 1e-3  # the policy is not the reference
    metrics = learner.train(ip.TrainUpdate.of(batch), iteration=2)
    assert metrics["onpolicy_ratio_dev"] < 1e-5, metrics["onpolicy_ratio_dev"]


def test_checkpoint_resume_is_exact_and_exports_merged_and_adapter(case, tmp_path, checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_ray.export import export
    from rlhf_ray.models.lora import ADAPTER_SUBDIR

    learner = case.learner
    batch = ip.with_learner_old(learner, ip.synthetic_batch(seed=2))
    ip.train(learner, batch, iteration=3)
    assert learner.save_checkpoint(str(tmp_path / "ckpt"), tokenizer_path=case.model)
    saved, saved_head = learner.policy_state_dict(), ip.value_head_state(learner)
    policy_dir = tmp_path / "ckpt" / "policy"
    merged = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32)
    assert ip.max_abs_diff(saved, merged.state_dict()) == 0
    base = AutoModelForCausalLM.from_pretrained(case.model, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(policy_dir / ADAPTER_SUBDIR)).eval()
    ids = batch.input_ids[:2]
    with torch.no_grad():
        gap = (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max()
    assert float(gap) < 1e-4
    # rlhf_ray.export writes either the merged model or the adapter alone
    (tmp_path / "ckpt" / "COMPLETE").touch()
    assert export(str(tmp_path / "ckpt"), str(tmp_path / "merged")) and \
        (tmp_path / "merged" / "model.safetensors").is_file()
    assert export(str(tmp_path / "ckpt"), str(tmp_path / "adapter"), adapter_only=True)
    assert sorted(p.name for p in (tmp_path / "adapter").glob("adapter_*")) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    assert not (tmp_path / "adapter" / "model.safetensors").exists()

    # Adam moments and the schedule came back too
    target, replayed = ip.replay_after_load(learner, batch, str(tmp_path / "ckpt"), saved, saved_head, iteration=4)
    assert ip.max_abs_diff(target, replayed) == 0


BF16_TOL = 2e-2  # bf16 learner vs the fp32 plain forward (as in test_learner_inprocess)


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_bf16_lora_keeps_a_float32_head_the_base_reference_and_a_bf16_merged_sync(tiny_model, checkpoint, stage):
    cfg = ip.learner_config(tiny_model, zero_stage=stage, dtype="bfloat16",
                            **{"model.lora.rank": 4, "model.lora.alpha": 8, "learner.lr": 1e-2})
    learner, _ = ip.build_learner(cfg)
    try:
        batch = ip.synthetic_batch(seed=3)
        first = ip.train(learner, ip.with_learner_old(learner, batch), iteration=0)
        assert first["onpolicy_ratio_dev"] < BF16_TOL
        assert all(v == torch.float32 for v in ip.value_head_dtypes(learner).values())
        temperature = learner.spec.temperature
        base_lp, _ = ip.plain_forward(tiny_model, checkpoint, ip.value_head_state(learner), batch, temperature, "cpu")
        ref = learner.reference_logprobs(batch, temperature)
        assert float((ref - base_lp).abs().max()) < BF16_TOL  # adapters off: the base model, after an update
        old_lp, _ = learner.compute_old(batch)
        assert float((old_lp - base_lp).abs().max()) > 5 * BF16_TOL  # the adapters moved the policy
        _, exported = ip.sync_export(learner, bucket_bytes=32 * 1024)
        assert set(exported) == {n for n in checkpoint if _adapted(n)}
        assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    finally:
        ip.release(learner)
