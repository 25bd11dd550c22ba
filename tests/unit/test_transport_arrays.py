"""Object-store transport on the CPU: a bucket to one flat numpy array and back.

Round trips must be bit-exact (NaN, -0.0, inf and subnormals included), for float32, bfloat16
(carried as int16 bit patterns) and float16, over buckets of mixed shapes. The CUDA path
(pinned host copy) is checked in tests/gpu/test_transport_pinned.py.
"""

import logging

import numpy as np
import pytest
import torch

from rlhf_ray.weight_sync.plan import Bucket, TensorSpec, dtype_name
from rlhf_ray.weight_sync.transport import from_array, to_array

SHAPES = [(3, 5), (7,), (), (2, 1, 4), (1,)]  # a scalar, and B != R so a transposed view differs


def _bucket_tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layer.{i}": torch.randn(shape, generator=g).to(dtype) for i, shape in enumerate(SHAPES)}
    specials = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40]).to(dtype)
    tensors["layer.0"].view(-1)[:5] = specials  # 1e-40: subnormal in float32 and bf16, 0 in fp16
    tensors["layer.t"] = torch.randn(5, 3, generator=g).to(dtype).t()  # non-contiguous
    return tensors


def _bucket(tensors: dict[str, torch.Tensor]) -> Bucket:
    return Bucket(tuple(TensorSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in tensors.items()))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so that NaN == NaN and -0.0 != 0.0."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype,wire", [(torch.float32, np.float32), (torch.bfloat16, np.int16),
                                        (torch.float16, np.int16)])
def test_round_trip_is_bit_exact(dtype, wire):
    sent = _bucket_tensors(dtype)
    bucket = _bucket(sent)
    array = to_array(list(sent.values()))
    assert array.ndim == 1 and array.dtype == wire
    assert array.size == bucket.numel == sum(t.numel() for t in sent.values())
    assert array.nbytes == bucket.nbytes
    array.setflags(write=False)  # as Ray hands it out from shared memory
    got = from_array(array, bucket, torch.device("cpu"))
    assert [name for name, _ in got] == list(sent)  # plan order
    for name, t in got:
        assert t.dtype == dtype and t.shape == sent[name].shape, name
        assert torch.equal(_bits(t), _bits(sent[name])), name


def test_bfloat16_travels_as_its_bit_patterns():
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    # bf16 is the top half of float32: 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00
    assert to_array([t]).tolist() == [0x3F80, 0xC000 - 0x10000, 0x3F00]


def test_buckets_of_a_mixed_model_round_trip_in_order():
    # A sync is several buckets of different dtypes; each goes through its own array.
    buckets = [_bucket_tensors(torch.float32, seed=1), _bucket_tensors(torch.bfloat16, seed=2),
               _bucket_tensors(torch.float32, seed=3)]
    arrays = [to_array(list(b.values())) for b in buckets]  # all held at once, as a deferred put would
    for sent, array in zip(buckets, arrays):
        got = dict(from_array(array, _bucket(sent), torch.device("cpu")))
        for name, t in sent.items():
            assert torch.equal(_bits(got[name]), _bits(t)), name


def test_array_owns_its_memory():
    # The array must not alias the source tensors (the learner keeps training them) nor an
    # earlier array (a later bucket must not overwrite one not yet copied by ray.put).
    source = torch.arange(6.0)
    first = to_array([source])
    second = to_array([source + 100])
    source.zero_()
    assert first.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert second.tolist() == [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]
    assert not np.shares_memory(first, second)


def test_from_array_rejects_a_bucket_of_another_size():
    bucket = Bucket((TensorSpec("a", (2, 3), "float32"),))
    with pytest.raises(ValueError, match="flat buffer has 5 elements, bucket expects 6"):
        from_array(to_array([torch.zeros(5)]), bucket, torch.device("cpu"))


class _Worker:
    """A stand-in for vLLM's worker with the receiver mixed in: its reload logs what vLLM logs
    for layers a sync did not send."""

    def __new__(cls):
        from rlhf_ray.backends.vllm import WeightReceiver

        worker = type("Worker", (WeightReceiver,), {})()
        worker.model_runner = type("Runner", (), {"model": torch.nn.Linear(2, 2)})()
        worker.loaded = []

        def reload_weights(weights_iterator):
            worker.loaded = [name for name, _ in weights_iterator]
            logging.getLogger("vllm.model_executor.model_loader.reload.inplace").warning(
                "Following weights were not loaded: ['gpt_neox.final_layer_norm.weight']")

        worker.reload_weights = reload_weights
        return worker


@pytest.mark.parametrize("partial", [False, True])
def test_the_engine_keeps_not_loaded_warnings_unless_the_plan_is_partial(caplog, partial):
    """Whether a sync leaves layers out comes from the learner's plan, not from the tensor names:
    a full sync of a model whose embedding is not called embed_tokens/wte (GPT-NeoX: embed_in)
    keeps vLLM's "not loaded" warnings, which then mean a real mismatch."""
    from rlhf_ray.weight_sync.plan import TensorSpec, plan_buckets, to_wire
    from rlhf_ray.weight_sync.transport import to_array

    w = {"gpt_neox.embed_in.weight": torch.ones(4, 2), "embed_out.weight": torch.ones(4, 2)}
    buckets = plan_buckets([TensorSpec(n, tuple(t.shape), "float32") for n, t in w.items()], 1 << 20)
    arrays = [to_array([w[s.name] for s in b.specs]) for b in buckets]
    worker = _Worker()
    with caplog.at_level(logging.WARNING):
        worker.rlhf_load_arrays(to_wire(buckets), arrays, partial)
    assert worker.loaded == list(w)
    assert ("were not loaded" in caplog.text) is not partial
