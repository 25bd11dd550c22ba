"""Pure planning of a weight sync: which tensors go in which bucket, and (un)flattening.

A sync moves the policy's tensors (never the value head) from learner rank 0 to every
rollout engine. Sending one message per tensor costs a round trip each; instead tensors
are grouped into buckets of about ``bucket_bytes``, one dtype per bucket, and each
bucket travels as one flat tensor (collective) or one flat array (object store).

Standard library and torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16,
                                                          torch.float64, torch.int64, torch.int32,
                                                          torch.uint8, torch.int8)}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r} in a weight-sync plan") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the plan, under the name the inference engine expects."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_from_name(self.dtype).itemsize


@dataclass(frozen=True)
class Bucket:
    """Tensors sent together as one flat buffer of a single dtype."""

    specs: tuple[TensorSpec, ...]

    @property
    def dtype(self) -> str:
        return self.specs[0].dtype

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def to_wire(buckets: Sequence[Bucket]) -> list[list[tuple[str, list[int], str]]]:
    """Plain lists/tuples form of a plan, safe for any RPC serializer (vLLM's msgspec included)."""
    return [[(s.name, list(s.shape), s.dtype) for s in b.specs] for b in buckets]


def from_wire(wire: Sequence[Sequence[Sequence]]) -> list[Bucket]:
    return [Bucket(tuple(TensorSpec(str(n), tuple(int(x) for x in shape), str(d)) for n, shape, d in b))
            for b in wire]


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """Group ``specs`` in order into buckets of at most ``bucket_bytes`` (a larger tensor gets
    a bucket of its own), starting a new bucket whenever the dtype changes.
    Every spec lands in exactly one bucket, and the order of names is preserved."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in a weight-sync plan")
    buckets: list[Bucket] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and (spec.dtype != current[0].dtype or size + spec.nbytes > bucket_bytes):
            buckets.append(Bucket(tuple(current)))
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        buckets.append(Bucket(tuple(current)))
    return buckets


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors of one dtype into a 1-D contiguous buffer."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """Split a bucket's flat buffer back into (name, tensor) views, in plan order."""
    if flat.numel() != bucket.numel:
        raise ValueError(f"flat buffer has {flat.numel()} elements, bucket expects {bucket.numel}")
    out, offset = [], 0
    for spec in bucket.specs:
        out.append((spec.name, flat[offset: offset + spec.numel].view(spec.shape)))
        offset += spec.numel
    return out
