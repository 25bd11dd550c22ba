"""The training-engine contract (``rlhf_ray.backends.engine.TrainEngine``), checked the same way
for every backend (``learner.backend``: deepspeed, fsdp2) on the tiny Llama inside the
learner's actor-critic (value head detached, as the learner holds it).

Each backend runs in spawned gloo processes that join their group like the learner does (rank 0
serves the rendezvous, every rank calls the backend's ``join_group``): one rank with the whole
batch and two ranks with half of it each, started together. Every case runs in those processes
in turn; the tests here compare what they saved:
- one rank and two ranks make the same update (SGD, two micro-batches per rank, two steps;
  sharding stages 2 and 3), and the same as a plain full-batch step in this process: backward
  sums over ranks and micro-batches, step zeroes the gradients;
- a step whose gradient is not finite is skipped: weights, learning rate and optimiser state
  (the next steps equal those of an engine that never saw it) untouched;
- save then load into a freshly built engine: the next step is the same;
- ``gathered`` over every parameter gives the checkpoint's tensors and shapes, also after a
  no-grad forward;
- bf16: bf16 logits, float32 optimiser state (and for fsdp2 float32 master weights), a step
  moves the weights;
- LoRA: only the adapters change.

About 1 minute on a busy 2-core machine.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_train_engines.py
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp

BACKENDS = ("deepspeed", "fsdp2")
B, T, R = 8, 8, 6  # sequences in a step's full batch, tokens per sequence, response tokens scored
MICRO = 2  # micro-batches per rank and step
VOCAB = 512  # the tiny model's vocabulary
LORA_TARGETS = ("q_proj", "v_proj")
START_S = 300  # the processes of one backend finish within this (~30 s measured)


# --------------------------------------------------------------------------- in the ranks


def _learner(backend: str, world: int, **overrides):
    from rlhf_ray.config import LearnerConfig

    base = dict(backend=backend, num_ranks=world, zero_stage=2, micro_batch_size=B // world // MICRO,
                optimizer="adamw", lr=1e-2, max_grad_norm=1.0)
    base.update(overrides)
    return LearnerConfig(**base)


def _build(backend: str, model_path: str, lrn, dtype: str = "float32", lora: bool = False):
    from rlhf_ray.backends.engine import EngineSettings, train_backend
    from rlhf_ray.models import ActorCritic
    from rlhf_ray.models.lora import LoraSpec

    def load():
        model = ActorCritic.from_pretrained(model_path, torch_dtype=getattr(torch, dtype),
                                            lora=LoraSpec(4, 8.0, 0.0, LORA_TARGETS) if lora else None)
        model.detach_value_head()  # the learner trains the value head outside the engine
        return model

    settings = EngineSettings(learner=lrn, dtype=dtype, grad_accum_steps=MICRO, total_steps=10)
    return train_backend(backend).build(load, settings)


def _batch(step: int) -> torch.Tensor:
    """Step ``step``'s full batch: (B, T) int64 token ids, the same on every rank."""
    return torch.randint(4, VOCAB, (B, T), generator=torch.Generator().manual_seed(1000 + step))


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the last R tokens of ``ids`` (b, T), divided by the tokens of the
    whole step (B * R, over all ranks): the micro-batch losses of all ranks sum to the full batch's."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, ids[:, -R:, None]).sum() / (B * R)


def _train_step(engine, step: int, rank: int, world: int, poison: bool = False):
    micro_batches = _batch(step).chunk(world)[rank].chunk(MICRO)
    for i, ids in enumerate(micro_batches):
        loss = _loss(engine(ids, torch.ones_like(ids), response_len=R).logits, ids)
        if poison and rank == 0 and i == 0:
            loss = loss * float("nan")  # one rank's micro-batch: the step must still be skipped everywhere
        engine.backward(loss, last=i == len(micro_batches) - 1)
    return engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    from rlhf_ray.backends.engine import gather_full_state_dict

    return gather_full_state_dict(engine, engine.module.named_parameters(), keep=True)


def _float(x) -> float:
    return float(x.item() if torch.is_tensor(x) else x)


def _case_update(backend, model_path, rank, world, out, zero_stage=2):
    """Two SGD steps, no clipping."""
    lrn = _learner(backend, world, optimizer="sgd", lr=0.5, max_grad_norm=0.0, zero_stage=zero_stage)
    engine = _build(backend, model_path, lrn)
    outcomes = [_train_step(engine, step, rank, world) for step in range(2)]
    return {"weights": _weights(engine), "grad_norms": [_float(o.grad_norm) for o in outcomes],
            "applied": [o.applied for o in outcomes]}


def _case_skip(backend, model_path, rank, world, out):
    """good, poisoned, good steps vs good, good steps; a warm-up makes the learning rate move."""
    lrn = _learner(backend, world, warmup_steps=4)
    engine = _build(backend, model_path, lrn)
    _train_step(engine, 0, rank, world)
    before, lr_before = _weights(engine), engine.lr()
    skipped = _train_step(engine, 1, rank, world, poison=True)
    after, lr_after = _weights(engine), engine.lr()
    _train_step(engine, 2, rank, world)
    clean = _build(backend, model_path, lrn)
    for step in (0, 2):
        _train_step(clean, step, rank, world)
    return {"applied": skipped.applied, "grad_norm": _float(skipped.grad_norm), "before": before,
            "after": after, "lr": (lr_before, lr_after), "final": _weights(engine), "clean": _weights(clean)}


def _case_checkpoint(backend, model_path, rank, world, out):
    lrn = _learner(backend, world, warmup_steps=3)
    engine = _build(backend, model_path, lrn)
    _train_step(engine, 0, rank, world)
    engine.save(str(out / "checkpoint"))
    _train_step(engine, 1, rank, world)
    fresh = _build(backend, model_path, lrn)
    fresh.load(str(out / "checkpoint"))
    lr_loaded = fresh.lr()
    _train_step(fresh, 1, rank, world)
    try:
        fresh.load(str(out / "nothing-here"))
        missing = None
    except Exception as exc:  # the test names the expected type
        missing = f"{type(exc).__name__}: {exc}"
    return {"continued": _weights(engine), "resumed": _weights(fresh), "lr": (engine.lr(), fresh.lr()),
            "lr_loaded": lr_loaded, "missing": missing}


def _case_gathered(backend, model_path, rank, world, out):
    engine = _build(backend, model_path, _learner(backend, world))
    ids = _batch(0)[:2]
    with torch.no_grad():  # a no-grad pass leaves the module's parameters as they were (sharded)
        engine(ids, torch.ones_like(ids), response_len=R)
    params = list(engine.module.named_parameters())
    return {"weights": _weights(engine), "shapes": {n: engine.full_shape(p) for n, p in params},
            "local": {n: engine.local_numel(p) for n, p in params}}


def _case_bf16(backend, model_path, rank, world, out):
    engine = _build(backend, model_path, _learner(backend, world, lr=1e-3), dtype="bfloat16")
    ids = _batch(0)[:2]
    with torch.no_grad():
        logits = engine(ids, torch.ones_like(ids), response_len=R).logits
    before = _weights(engine)
    outcome = _train_step(engine, 0, rank, world)
    state = getattr(engine, "optimizer").state.values()
    return {"logits": logits.dtype, "params": {p.dtype for p in engine.module.parameters()},
            "optimizer": {v.dtype for s in state for v in s.values() if torch.is_tensor(v) and v.dim() > 0},
            "applied": outcome.applied, "before": before, "after": _weights(engine)}


def _case_lora(backend, model_path, rank, world, out):
    engine = _build(backend, model_path, _learner(backend, world), lora=True)
    before = _weights(engine)
    outcomes = [_train_step(engine, step, rank, world) for step in range(2)]
    return {"before": before, "after": _weights(engine), "applied": [o.applied for o in outcomes],
            "trainable": sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)}


def _case_update_zero3(backend, model_path, rank, world, out):
    return _case_update(backend, model_path, rank, world, out, zero_stage=3)


CASES: dict[str, Callable] = {"update": _case_update, "update_zero3": _case_update_zero3, "skip": _case_skip, "checkpoint": _case_checkpoint,
                              "gathered": _case_gathered, "bf16": _case_bf16, "lora": _case_lora}


def _rank(rank: int, world: int, backend: str, model_path: str, out_dir: str) -> None:
    """One rank: join the group, run the cases (all with two ranks, the update alone with one),
    save {case: result or the traceback} as rank<r>.pt under ``out_dir``."""
    from rlhf_ray.backends.engine import train_backend
    from rlhf_ray.weight_sync.transport import serve_rendezvous

    torch.set_num_threads(1)
    out = Path(out_dir)
    port_file = out / "port"
    if rank == 0:
        host, port, store = serve_rendezvous("127.0.0.1", 60.0)  # noqa: F841 (kept up while the group lives)
        (out / "port.tmp").write_text(str(port))
        os.replace(out / "port.tmp", port_file)
    else:
        while not port_file.exists():
            time.sleep(0.05)
        port = int(port_file.read_text())
    train_backend(backend).join_group("127.0.0.1", port, rank, world, 60.0)
    results = {}
    for name in CASES if world > 1 else ("update", "update_zero3"):
        try:
            results[name] = CASES[name](backend, model_path, rank, world, out)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, out / f"rank{rank}.pt")


# --------------------------------------------------------------------------- in the test process


@dataclass(frozen=True)
class Runs:
    backend: str
    results: dict  # (world size, rank) -> {case: result, or {"error": traceback}}


@pytest.fixture(scope="module", params=BACKENDS)
def runs(request, tiny_model, tmp_path_factory) -> Runs:
    """What one backend's ranks saved, one and two ranks run together."""
    backend = request.param
    root = tmp_path_factory.mktemp(f"engine-{backend}")
    started = []
    for world in (1, 2):
        (root / f"w{world}").mkdir()
        started.append(mp.start_processes(_rank, args=(world, backend, tiny_model, str(root / f"w{world}")),
                                          nprocs=world, start_method="spawn", join=False))
    deadline = time.monotonic() + START_S
    for ctx in started:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {backend} ranks did not finish within {START_S} s")
    return Runs(backend, {(w, r): torch.load(root / f"w{w}" / f"rank{r}.pt", weights_only=False)
                          for w in (1, 2) for r in range(w)})


def _result(runs: Runs, case: str, world: int = 2, rank: int = 0) -> dict:
    res = runs.results[(world, rank)][case]
    if "error" in res:
        pytest.fail(f"case {case!r} raised on rank {rank} of {world}:\n{res['error']}")
    return res


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _reference_update(model_path: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Two full-batch SGD steps (lr 0.5) of the plain actor-critic in this process: the weights
    and each step's gradient norm."""
    from rlhf_ray.models import ActorCritic

    model = ActorCritic.from_pretrained(model_path)
    model.detach_value_head()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    norms = []
    for step in range(2):
        ids = _batch(step)
        _loss(model(ids, torch.ones_like(ids), response_len=R).logits, ids).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


@pytest.fixture(scope="module")
def reference(tiny_model) -> tuple[dict[str, torch.Tensor], list[float]]:
    return _reference_update(tiny_model)


@pytest.mark.parametrize("case", ["update", "update_zero3"], ids=["zero2", "zero3"])
def test_one_and_two_ranks_make_the_full_batch_update(runs, reference, case):
    one, two = _result(runs, case, world=1), _result(runs, case)
    two_r1 = _result(runs, case, rank=1)
    assert one["applied"] == two["applied"] == [True, True]
    expected, norms = reference
    # float32, the same sums in another order: measured <= 3e-8 (a rank mean is off by 6e-2)
    assert _max_diff(one["weights"], expected) < 1e-5
    assert _max_diff(two["weights"], one["weights"]) < 1e-5
    assert _max_diff(two_r1["weights"], two["weights"]) == 0.0  # both ranks hold the same model
    for got in (one["grad_norms"], two["grad_norms"], two_r1["grad_norms"]):
        assert got == pytest.approx(norms, rel=1e-5)


def test_a_non_finite_step_is_skipped(runs):
    res = _result(runs, "skip")
    assert res["applied"] is False
    assert not torch.isfinite(torch.tensor(res["grad_norm"]))
    assert _max_diff(res["after"], res["before"]) == 0.0
    assert res["lr"][0] == res["lr"][1]
    # AdamW's moments and step count untouched: the next step equals one of an engine that never saw it
    assert _max_diff(res["final"], res["clean"]) < 1e-6
    assert _max_diff(res["final"], res["before"]) > 1e-4


def test_checkpoint_round_trip(runs):
    for rank in (0, 1):
        res = _result(runs, "checkpoint", rank=rank)
        assert res["lr_loaded"] == pytest.approx(2 / 3 * 1e-2)  # warm-up step 1 of 3 after one step
        assert res["lr"][0] == res["lr"][1]
        assert _max_diff(res["resumed"], res["continued"]) < 1e-6


def test_load_without_state_raises_file_not_found(runs):
    missing = _result(runs, "checkpoint")["missing"]
    assert missing is not None and missing.startswith("FileNotFoundError: "), \
        f"load from an empty directory must raise FileNotFoundError, got {missing}"


def test_gathered_gives_the_full_weights(runs, checkpoint):
    from rlhf_ray.models.actor_critic import POLICY_PREFIX

    ranks = [_result(runs, "gathered", rank=r) for r in (0, 1)]
    expected = {POLICY_PREFIX + k: v for k, v in checkpoint.items()}
    for res in ranks:
        assert res["weights"].keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(res["weights"][name], value), name
            assert res["shapes"][name] == tuple(value.shape), name
    for name, value in expected.items():
        held = [res["local"][name] for res in ranks]
        assert all(0 <= n <= value.numel() for n in held) and sum(held) >= value.numel(), name
    if runs.backend == "fsdp2":  # sharded: the ranks hold disjoint parts
        assert all(sum(res["local"][n] for res in ranks) == v.numel() for n, v in expected.items())


def test_bf16_computes_in_bf16_and_keeps_float32_state(runs):
    res = _result(runs, "bf16")
    assert res["logits"] == torch.bfloat16
    assert res["optimizer"] == {torch.float32}
    if runs.backend == "fsdp2":
        assert res["params"] == {torch.float32}  # the sharded master weights
    assert res["applied"] is True
    assert _max_diff(res["after"], res["before"]) > 0
    # what a sync or an export carries: the compute dtype, whatever the master copy's
    assert {t.dtype for t in res["after"].values()} == {torch.bfloat16}


def test_lora_trains_only_the_adapters(runs):
    res = _result(runs, "lora")
    assert res["applied"] == [True, True]
    assert res["trainable"] and all(".lora_" in n for n in res["trainable"])
    for name, value in res["before"].items():
        moved = not torch.equal(res["after"][name], value)
        assert moved == (name in res["trainable"]), name  # B moves at step 1, A (B = 0 before) at step 2
