"""The learner's DeepSpeed settings: ZeRO-3 sizes, offload, the activation-memory rule, the
value head's replica (``rlhf_ray.backends``), all without starting a process group."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.backends.deepspeed import build_optimizer, learner_ds_config
from rlhf_ray.backends.engine import gather_full_state_dict, make_torch_optimizer, nothing_to_gather
from rlhf_ray.backends.memory import activation_bytes, needs_activation_checkpointing
from rlhf_ray.backends.replicated import ReplicatedModule, replicate
from rlhf_ray.config import LearnerConfig


def test_zero3_buckets_follow_the_hidden_size():
    conf = learner_ds_config(LearnerConfig(zero_stage=3), 4, "bfloat16", hidden_size=1024)
    zero = conf["zero_optimization"]
    # 10 H: norms and biases stay whole; 0.9 H^2 prefetched; H^2 per reduce bucket.
    assert zero["stage3_param_persistence_threshold"] == 10240
    assert zero["stage3_prefetch_bucket_size"] == 943718
    assert zero["reduce_bucket_size"] == 1048576
    assert conf["bf16"] == {"enabled": True}
    assert "stage3_param_persistence_threshold" not in learner_ds_config(LearnerConfig(zero_stage=2), 4,
                                                                         "float32")["zero_optimization"]


def test_offload_allows_a_torch_optimizer_as_the_fallback():
    conf = learner_ds_config(LearnerConfig(zero_stage=2, offload_optimizer=True), 2, "bfloat16")
    assert conf["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert conf["zero_force_ds_cpu_optimizer"] is False


def test_activation_bytes_hand_example():
    # The docstring's case: 16 x 1024 tokens, half scored, H 1024, I 4096, 24 layers, V 32000, bf16:
    # per block 8 H + 12 H + 4 H + 8 I = 57344 bytes a token, the final norm 6 H; the logits 6 bytes
    # each, and 4 float32 copies of a 4096-position chunk (rlhf_ray.backends.memory).
    assert activation_bytes(16384, 8192, 1024, 4096, 24, 32000) == (16384 * (24 * 57344 + 6144) + 8192 * 32000 * 6
                                                                    + 16 * 4096 * 32000)
    assert activation_bytes(1, 0, 10, 20, 2, 5) == 2 * (80 + 120 + 40 + 160) + 60


def test_checkpointing_only_when_activations_do_not_fit():
    need = activation_bytes(16384, 8192, 1024, 4096, 24, 32000)  # ~26.3 GB
    args = (16384, 8192, 1024, 4096, 24, 32000)
    assert not needs_activation_checkpointing(*args, free_bytes=60 * 2**30)
    assert needs_activation_checkpointing(*args, free_bytes=20 * 2**30)
    assert needs_activation_checkpointing(*args, free_bytes=int(need / 0.8) - 1)
    assert not needs_activation_checkpointing(*args, free_bytes=int(need / 0.8) + 1)


def test_adamw_is_fused_only_on_cuda():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_torch_optimizer([{"params": [p]}], LearnerConfig())
    assert opt.param_groups[0]["fused"] == (True if torch.cuda.is_available() else None)
    assert make_torch_optimizer([{"params": [p]}], LearnerConfig(), fused=False).param_groups[0]["fused"] is None
    assert isinstance(make_torch_optimizer([{"params": [p]}], LearnerConfig(optimizer="sgd")), torch.optim.SGD)


def test_offloaded_adamw_is_deepspeeds_cpu_adam():
    # Builds DeepSpeed's CPU Adam op on first use (~1 minute here, then cached).
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    model = torch.nn.Linear(4, 2)
    opt = build_optimizer(model, LearnerConfig(offload_optimizer=True, lr=0.1))
    assert isinstance(opt, DeepSpeedCPUAdam)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["name"] == "policy"


# --------------------------------------------------------------------------- the value head's replica


def _head_and_grad(weight_grad: list[float], bias_grad: float) -> torch.nn.Linear:
    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0]]))
        head.bias.fill_(0.5)
    head.weight.grad = torch.tensor([weight_grad])
    head.bias.grad = torch.tensor([bias_grad])
    return head


def test_replica_clips_its_own_norm_and_steps_sgd_by_hand():
    head = _head_and_grad([3.0, 0.0], 4.0)  # norm 5
    lrn = LearnerConfig(optimizer="sgd", lr=0.1, max_grad_norm=1.0)
    rep = replicate(head, lrn, total_steps=10, device=torch.device("cpu"), world_size=1)
    norm = rep.step()
    assert float(norm) == pytest.approx(5.0)
    # clipped to norm 1: grads (0.6, 0, 0.8); SGD lr 0.1
    assert head.weight[0].tolist() == pytest.approx([1.0 - 0.06, 2.0])
    assert head.bias.tolist() == pytest.approx([0.5 - 0.08])
    assert head.weight.grad is None and head.weight.dtype == torch.float32


def test_replica_divides_out_the_engines_outside_grad_scale():
    # A DeepSpeed engine of 4 ranks runs autograd on loss x 4 (TrainEngine.outside_grad_scale):
    # the head's gradient (4, 0) and 8 is 4x the true (1, 0) and 2. SGD lr 0.1, no clipping.
    head = _head_and_grad([4.0, 0.0], 8.0)
    lrn = LearnerConfig(optimizer="sgd", lr=0.1, max_grad_norm=0.0)
    rep = replicate(head, lrn, total_steps=10, device=torch.device("cpu"), world_size=1, grad_scale=4.0)
    assert float(rep.step()) == pytest.approx(5 ** 0.5)  # |(1, 0, 2)|
    assert head.weight[0].tolist() == pytest.approx([0.9, 2.0])
    assert head.bias.tolist() == pytest.approx([0.3])


def test_replica_skips_non_finite_gradients_and_skipped_engine_steps():
    lrn = LearnerConfig(optimizer="sgd", lr=0.1, max_grad_norm=0.0)
    head = _head_and_grad([float("nan"), 0.0], 1.0)
    rep = replicate(head, lrn, total_steps=10, device=torch.device("cpu"), world_size=1)
    assert not torch.isfinite(rep.step())
    assert head.weight.tolist() == [[1.0, 2.0]] and head.bias.tolist() == [0.5]
    head.weight.grad, head.bias.grad = torch.tensor([[1.0, 1.0]]), torch.tensor([1.0])
    rep.step(engine_stepped=False)  # the engine skipped this step (overflow): the head does too
    assert head.weight.tolist() == [[1.0, 2.0]]
    head.weight.grad, head.bias.grad = torch.tensor([[1.0, 1.0]]), torch.tensor([1.0])
    rep.step()
    assert head.weight[0].tolist() == pytest.approx([0.9, 1.9])


def test_replica_state_round_trips_with_its_schedule():
    lrn = LearnerConfig(lr=0.01, value_head_lr=0.1, warmup_steps=4)
    a = replicate(_head_and_grad([1.0, 1.0], 1.0), lrn, 10, torch.device("cpu"), 1)
    assert a.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 1 / 4)  # value_head_lr, warm-up
    a.step()
    b = replicate(_head_and_grad([0.0, 0.0], 0.0), lrn, 10, torch.device("cpu"), 1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.module.weight, a.module.weight)
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 2 / 4)
    assert isinstance(b, ReplicatedModule)


class _WholeEngine:
    """An engine whose parameters are whole on every rank (ZeRO 0-2): nothing to gather."""

    gathered = staticmethod(nothing_to_gather)


def test_gather_full_state_dict_copies_on_the_keeping_rank_only():
    # Where every rank holds full parameters: no collective, the same copies. (Sharded engines are
    # covered by tests/unit/test_train_engines.py and tests/integration/test_train_entrypoints.py.)
    model = torch.nn.Linear(3, 2)
    engine = _WholeEngine()
    full = gather_full_state_dict(engine, model.named_parameters(), keep=True)
    assert list(full) == ["weight", "bias"]
    for name, p in model.named_parameters():
        assert torch.equal(full[name], p.detach()) and full[name].device.type == "cpu"
        assert full[name].data_ptr() != p.data_ptr() and not full[name].requires_grad  # copies, not views
    assert gather_full_state_dict(engine, model.named_parameters(), keep=False) == {}
