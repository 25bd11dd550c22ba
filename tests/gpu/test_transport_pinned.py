"""Object-store transport from CUDA tensors: the device-to-host copy through pinned memory.

Marked ``gpu``; skipped cleanly without CUDA. Run on a GPU node with
``scripts/test.sh tests/gpu/test_transport_pinned.py``. Checks that the array is bit-exact
(bf16 and fp32, special values, mixed shapes, a non-contiguous tensor), that it lies in pinned
memory, and that each array owns its buffer (a later bucket does not overwrite an earlier one).
"""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.weight_sync.plan import Bucket, TensorSpec, dtype_name
from rlhf_ray.weight_sync.transport import from_array, to_array

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cuda_bucket(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    tensors = {
        "w": torch.randn(64, 33, device="cuda", generator=g).to(dtype),
        "b": torch.randn(33, device="cuda", generator=g).to(dtype),
        "s": torch.tensor(3.0, device="cuda").to(dtype),
        "t": torch.randn(17, 9, device="cuda", generator=g).to(dtype).t(),  # non-contiguous
    }
    tensors["w"].view(-1)[:5] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40],
                                             device="cuda").to(dtype)
    return tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pinned_export_is_bit_exact(dtype):
    sent = _cuda_bucket(dtype, seed=0)
    bucket = Bucket(tuple(TensorSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in sent.items()))
    array = to_array(list(sent.values()))
    assert array.nbytes == bucket.nbytes
    assert torch.from_numpy(array).is_pinned()  # went through page-locked memory
    for device in (torch.device("cpu"), torch.device("cuda")):
        got = dict(from_array(array, bucket, device))
        for name, t in sent.items():
            assert got[name].dtype == dtype and got[name].shape == t.shape, name
            assert torch.equal(_bits(got[name]), _bits(t)), (name, device)


def test_each_pinned_array_owns_its_buffer():
    first_sent = _cuda_bucket(torch.bfloat16, seed=1)
    first = to_array(list(first_sent.values()))
    expected = first.copy()
    second = to_array(list(_cuda_bucket(torch.bfloat16, seed=2).values()))  # same size class
    for t in first_sent.values():
        t.zero_()  # the learner updates its weights after the export
    torch.cuda.synchronize()
    assert (first == expected).all()
    assert first.ctypes.data != second.ctypes.data
