"""Weight-sync planning (pure) and the transports' building blocks.

The collective test runs a real 2-member gloo group on 127.0.0.1 (this process and one
subprocess): rank 0 broadcasts the buckets of a plan, rank 1 receives them, and the
received tensors must be bit-identical (NaN, -0.0, inf and subnormals included).
"""

import json
import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlhf_ray.weight_sync.plan import (
    Bucket,
    TensorSpec,
    dtype_from_name,
    dtype_name,
    flatten,
    from_wire,
    plan_buckets,
    to_wire,
    unflatten,
)
from rlhf_ray.weight_sync.transport import free_port, from_array, new_sync_group, send_buckets, to_array

REPO_ROOT = Path(__file__).resolve().parents[2]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-exact comparison (NaN == NaN, -0.0 != 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _names(buckets: list[Bucket]) -> list[list[str]]:
    return [[s.name for s in b.specs] for b in buckets]


# ---- specs and dtypes ------------------------------------------------------------


def test_tensor_spec_sizes():
    assert TensorSpec("w", (3, 5), "float32").numel == 15
    assert TensorSpec("w", (3, 5), "float32").nbytes == 60
    assert TensorSpec("w", (3, 5), "bfloat16").nbytes == 30
    assert TensorSpec("w", (3, 5), "int64").nbytes == 120
    assert TensorSpec("s", (), "float32").numel == 1
    assert TensorSpec("e", (0, 4), "float16").nbytes == 0


def test_dtype_names_round_trip():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
                  torch.uint8, torch.int8):
        assert dtype_from_name(dtype_name(dtype)) is dtype
    assert dtype_name(torch.bfloat16) == "bfloat16"


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="unsupported dtype 'complex64' in a weight-sync plan"):
        dtype_from_name("complex64")
    with pytest.raises(ValueError, match="unsupported dtype"):
        TensorSpec("w", (2,), "torch.float32").nbytes


# ---- plan_buckets ------------------------------------------------------------------


def test_plan_buckets_hand_example():
    specs = [
        TensorSpec("a", (10,), "float32"),  # 40 B
        TensorSpec("b", (5,), "float32"),  # 20 B -> 60 B with a
        TensorSpec("c", (20,), "float32"),  # 80 B > 64: a bucket of its own
        TensorSpec("d", (3,), "bfloat16"),  # dtype changes: new bucket
        TensorSpec("e", (2,), "bfloat16"),
        TensorSpec("f", (1,), "float32"),
    ]
    buckets = plan_buckets(specs, bucket_bytes=64)
    assert _names(buckets) == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert [b.nbytes for b in buckets] == [60, 80, 10, 4]
    assert [b.numel for b in buckets] == [15, 20, 5, 1]
    assert [b.dtype for b in buckets] == ["float32", "float32", "bfloat16", "float32"]


def test_plan_buckets_exact_fit_stays_in_the_bucket():
    specs = [TensorSpec("a", (8,), "float32"), TensorSpec("b", (8,), "float32"), TensorSpec("c", (1,), "float32")]
    assert _names(plan_buckets(specs, 64)) == [["a", "b"], ["c"]]


def test_plan_buckets_invariants_on_random_plans():
    rng = random.Random(0)
    dtypes = ["float32", "bfloat16", "int64"]
    for trial in range(50):
        specs = [TensorSpec(f"t{i}", tuple(rng.randint(1, 6) for _ in range(rng.randint(0, 3))),
                            rng.choice(dtypes)) for i in range(rng.randint(1, 30))]
        bucket_bytes = rng.choice([1, 16, 64, 200, 10**6])
        buckets = plan_buckets(specs, bucket_bytes)
        flat = [s for b in buckets for s in b.specs]
        assert flat == specs, trial  # every spec exactly once, in order
        for b in buckets:
            assert len({s.dtype for s in b.specs}) == 1
            assert b.nbytes <= bucket_bytes or len(b.specs) == 1
        # Greedy: a bucket is closed only when the next tensor would not fit or changes dtype.
        for b, nxt in zip(buckets, buckets[1:]):
            head = nxt.specs[0]
            assert head.dtype != b.dtype or b.nbytes + head.nbytes > bucket_bytes


def test_plan_buckets_edge_cases():
    assert plan_buckets([], 64) == []
    with pytest.raises(ValueError, match="bucket_bytes must be positive, got 0"):
        plan_buckets([TensorSpec("a", (1,), "float32")], 0)
    with pytest.raises(ValueError, match="duplicate tensor names"):
        plan_buckets([TensorSpec("a", (1,), "float32"), TensorSpec("a", (2,), "float32")], 64)


def test_wire_form_round_trips_and_is_plain():
    specs = [TensorSpec("model.w", (3, 5), "float32"), TensorSpec("model.b", (5,), "bfloat16"),
             TensorSpec("s", (), "float32")]
    buckets = plan_buckets(specs, 64)
    wire = to_wire(buckets)
    assert wire == [[("model.w", [3, 5], "float32")], [("model.b", [5], "bfloat16")], [("s", [], "float32")]]
    assert from_wire(wire) == buckets
    assert from_wire(json.loads(json.dumps(wire))) == buckets  # lists instead of tuples on the way back


# ---- flatten / unflatten -------------------------------------------------------------


def test_flatten_unflatten_round_trip_with_non_contiguous_input():
    w = torch.arange(15, dtype=torch.float32).reshape(5, 3).t()  # (3, 5), not contiguous
    b = torch.tensor([-1.0, -2.0])
    s = torch.tensor(7.0)
    bucket = Bucket((TensorSpec("w", (3, 5), "float32"), TensorSpec("b", (2,), "float32"),
                     TensorSpec("s", (), "float32")))
    flat = flatten([w, b, s])
    assert flat.shape == (18,) and flat.is_contiguous()
    assert flat[:5].tolist() == [0.0, 3.0, 6.0, 9.0, 12.0]  # row-major order of the logical (3, 5) tensor
    out = unflatten(flat, bucket)
    assert [n for n, _ in out] == ["w", "b", "s"]
    assert torch.equal(out[0][1], w) and torch.equal(out[1][1], b) and torch.equal(out[2][1], s)
    assert out[2][1].shape == ()
    # views into the buffer, not copies
    assert out[1][1].data_ptr() == flat.data_ptr() + 15 * 4


def test_flatten_detaches():
    p = torch.nn.Parameter(torch.ones(3))
    assert not flatten([p]).requires_grad


def test_unflatten_size_mismatch():
    bucket = Bucket((TensorSpec("w", (3, 5), "float32"),))
    with pytest.raises(ValueError, match="flat buffer has 14 elements, bucket expects 15"):
        unflatten(torch.zeros(14), bucket)


# ---- object-store arrays ---------------------------------------------------------------


def _special_values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g)
    w[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40])  # 1e-40 is subnormal in float32
    return {
        "model.w": w,
        "model.wt": torch.randn(5, 3, generator=g).t(),  # non-contiguous
        "model.h": torch.randn(4, generator=g).to(torch.bfloat16),
        "model.i": torch.tensor([[1, -2], [3, 2**40]], dtype=torch.int64),
        "model.s": torch.tensor(math.pi),
    }


def test_array_round_trip_is_bit_exact_per_bucket():
    sent = _special_values()
    specs = [TensorSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in sent.items()]
    buckets = plan_buckets(specs, bucket_bytes=64)
    assert {b.dtype for b in buckets} == {"float32", "bfloat16", "int64"}
    got = {}
    for b in buckets:
        array = to_array([sent[s.name] for s in b.specs])
        assert array.ndim == 1 and array.nbytes == b.nbytes
        array.setflags(write=False)  # as Ray hands it out from shared memory
        got.update(from_array(array, b, torch.device("cpu")))
    assert list(got) == list(sent)  # plan order
    for name, t in sent.items():
        assert _bit_equal(got[name], t), name
        assert got[name].dtype == t.dtype and got[name].shape == t.shape


def test_array_tensors_are_views_of_the_array_on_cpu():
    bucket = Bucket((TensorSpec("a", (2, 3), "float32"), TensorSpec("b", (4,), "float32")))
    array = to_array([torch.arange(6.0).view(2, 3), torch.arange(6.0, 10.0)])
    got = dict(from_array(array, bucket, torch.device("cpu")))
    assert got["a"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert got["b"].tolist() == [6.0, 7.0, 8.0, 9.0]
    array[0] = 42.0  # no copy was made: the engine loads straight from the object store's memory
    assert got["a"][0, 0].item() == 42.0


# ---- collective ---------------------------------------------------------------------


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown sync backend 'tcp'; use gloo"):
        new_sync_group("127.0.0.1", free_port(), 0, 1, "tcp", 5.0)


RECEIVER = textwrap.dedent(
    """
    import json, sys
    import torch
    from rlhf_ray.weight_sync.plan import from_wire
    from rlhf_ray.weight_sync.transport import new_sync_group, receive_buckets

    port, workdir = int(sys.argv[1]), sys.argv[2]
    with open(workdir + "/plan.json") as fh:
        buckets = from_wire(json.load(fh))
    group = new_sync_group("127.0.0.1", port, 1, 2, "gloo", 30.0)
    received, order = {}, []
    for name, t in receive_buckets(group, buckets, torch.device("cpu"), 30.0):
        received[name] = t.clone()
        order.append(name)
    assert order == [s.name for b in buckets for s in b.specs], order
    torch.save(received, workdir + "/received.pt")
    # Destroy the group before interpreter shutdown: left to exit-time teardown, gloo
    # sometimes aborts the process ("terminate called without an active exception").
    del group
    """
)


def test_gloo_broadcast_delivers_bit_identical_tensors(tmp_path):
    """This process is group rank 0 (the learner side); a subprocess is rank 1 (an engine)."""
    sent = _special_values()
    sent["model.big"] = torch.randn(40, generator=torch.Generator().manual_seed(1))  # 160 B: own bucket
    specs = [TensorSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in sent.items()]
    buckets = plan_buckets(specs, bucket_bytes=64)
    assert len(buckets) >= 4  # several buckets, several dtypes
    (tmp_path / "plan.json").write_text(json.dumps(to_wire(buckets)))

    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port), str(tmp_path)], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    group = None
    try:
        group = new_sync_group("127.0.0.1", port, 0, 2, "gloo", 30.0)
        nbytes = send_buckets(group, ([sent[s.name] for s in b.specs] for b in buckets), 30.0)
        output = child.communicate(timeout=60)[0]
    finally:
        group = None
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, output
    assert nbytes == sum(b.nbytes for b in buckets)
    received = torch.load(tmp_path / "received.pt")
    assert sorted(received) == sorted(sent)
    for name, t in sent.items():
        assert _bit_equal(received[name], t), name
