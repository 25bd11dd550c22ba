"""The two weight-sync transports' building blocks, used by both ends.

* collective: a dedicated process group between learner rank 0 (rank 0 of the group) and
  every rollout engine worker, created from a TCPStore so it never touches the default
  group of either side (DeepSpeed's on the learner, vLLM's on the engine). gloo on CPU,
  NCCL on GPU. Each bucket is one ``broadcast`` of a flat tensor.
* object_store: each bucket is a safetensors byte blob put into Ray's object store
  (bytes travel zero-copy between processes on a node and over Ray's transfer between nodes).
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

from rlhf_ray.weight_sync.plan import Bucket, dtype_from_name, flatten, unflatten


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def new_sync_group(master_addr: str, master_port: int, rank: int, world_size: int,
                   backend: str, timeout_s: float) -> dist.ProcessGroup:
    """A process group of ``world_size`` members, independent of the default group.

    All members must call this concurrently; rank 0 hosts the TCPStore."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0,
                          timeout=timeout, wait_for_workers=True)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":  # GPU only
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"unknown sync backend {backend!r}; use gloo (CPU) or nccl (GPU)")


def broadcast_bucket(group: dist.ProcessGroup, tensors: list[torch.Tensor], timeout_s: float) -> int:
    """Sender side (group rank 0): broadcast one bucket as one flat tensor. Returns bytes sent."""
    flat = flatten(tensors).contiguous()
    group.broadcast(flat, 0).wait(datetime.timedelta(seconds=timeout_s))
    return flat.numel() * flat.element_size()


def receive_bucket(group: dist.ProcessGroup, bucket: Bucket, device: torch.device,
                   timeout_s: float) -> list[tuple[str, torch.Tensor]]:
    """Receiver side: the matching broadcast into a fresh buffer, split back into named views."""
    flat = torch.empty(bucket.numel, dtype=dtype_from_name(bucket.dtype), device=device)
    group.broadcast(flat, 0).wait(datetime.timedelta(seconds=timeout_s))
    return unflatten(flat, bucket)


def encode_blob(named: list[tuple[str, torch.Tensor]]) -> bytes:
    """A bucket as safetensors bytes (CPU, contiguous copies)."""
    from safetensors.torch import save

    return save({name: t.detach().to("cpu").contiguous() for name, t in named})


def decode_blob(blob: bytes) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load

    return list(load(bytes(blob)).items())
