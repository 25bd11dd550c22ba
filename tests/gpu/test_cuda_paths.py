"""GPU-only paths: bf16 actor-critic on CUDA and the NCCL weight-sync group.

Marked ``gpu``; skipped cleanly on machines without CUDA (CI). Run on a GPU node with
``scripts/test.sh tests/gpu``.
"""

from __future__ import annotations

import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_actor_critic_bf16_on_cuda(tmp_path):
    from rlhf_ray.algorithms import logprobs_from_logits, value_loss
    from rlhf_ray.models import ActorCritic
    from rlhf_ray.tiny_models import build_tiny_model

    path = build_tiny_model(tmp_path / "m", arch="llama", seed=0)
    model = ActorCritic.from_pretrained(path, value_head_init_std=0.01, torch_dtype=torch.bfloat16).cuda()
    ids = torch.randint(4, 400, (3, 7), device="cuda")
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = model(ids, mask.long())
    assert out.logits.dtype == torch.bfloat16 and out.values.dtype == torch.float32
    lp = logprobs_from_logits(out.logits[:, :-1], ids[:, 1:])
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    loss = value_loss(out.values[:, :-1], torch.zeros(3, 6, device="cuda"), torch.ones(3, 6, device="cuda"),
                      mask[:, 1:]).loss - lp.mean()
    loss.backward()
    assert model.value_head.linear.weight.grad is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nccl_member(rank: int, port: int, result) -> None:
    from rlhf_ray.weight_sync.plan import Bucket, TensorSpec
    from rlhf_ray.weight_sync.transport import new_sync_group, receive_buckets, send_buckets

    torch.cuda.set_device(rank)
    group = new_sync_group("127.0.0.1", port, rank, 2, "nccl", 60)
    bucket = Bucket((TensorSpec("a", (3, 4), "bfloat16"), TensorSpec("b", (5,), "bfloat16")))
    if rank == 0:
        g = torch.Generator(device="cuda").manual_seed(0)
        tensors = [torch.randn(3, 4, device="cuda", generator=g).bfloat16(),
                   torch.randn(5, device="cuda", generator=g).bfloat16()]
        send_buckets(group, [tensors], 60)
        result.put([t.float().cpu() for t in tensors])
    else:
        got = list(receive_buckets(group, [bucket], torch.device("cuda", 1), 60))
        result.put([t.float().cpu() for _, t in got])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one rank per device)")
def test_nccl_sync_group_broadcasts_a_bucket_bit_exactly():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_nccl_member, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    a, b = q.get(timeout=120), q.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert all((x == y).all() for x, y in zip(a, b))
