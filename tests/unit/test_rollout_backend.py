"""The RolloutBackend contract (rlhf_ray/backends/rollout.py) is enough to run the PPO loop.

A fake backend, pure Python, sits behind the real ``RolloutEngine`` role: its tokens and logprobs
are a fixed function of the prompt, the sample's number and the "version" of the weights it last
loaded (the learner's update count, carried in the weights), and it records every call. The
coordinator runs a few PPO iterations with it through the control-flow fakes of
``test_coordinator.py`` (reference, reward) and a learner fake that holds weights; weights travel
by the real bucket plan and the real transports of both kinds (flat arrays; a gloo broadcast from a
thread), in-process, as ``runtime.groups.WeightSync`` moves them over Ray.

Also: the vLLM backend meets the contract (checked without importing vLLM), a backend missing a
method is refused with what it lacks, the role checks what a backend returns and refuses to
sample while paused, and rollout.backend's choices are the backends' table.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from rlhf_ray.backends.rollout import (BACKENDS, PauseState, RolloutBackend, RolloutSpec, SamplingSpec,
                                       backend_class, contract_errors, register_backend, rollout_env,
                                       unregister_backend)
from rlhf_ray.batch import Generation
from rlhf_ray.config import RolloutConfig, choices_of, config_from_dict
from rlhf_ray.config.choices import is_config_class
from rlhf_ray.coordinator.loop import PPOCoordinator
from rlhf_ray.runtime.pending import Done
from rlhf_ray.weight_sync.plan import TensorSpec, dtype_name, plan_buckets
from rlhf_ray.weight_sync.transport import (destroy_sync_group, from_array, new_sync_group, receive_buckets,
                                            reserve_port, send_buckets, to_array)
from rlhf_ray.workers.rollout import RolloutEngine
from tests.unit.test_coordinator import EOS, PAD, VOCAB, FakeLearners, FakeReference, FakeReward, _prompts, _put

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE = "fake-for-tests"
B, N, R = 3, 2, 5  # prompts per iteration, samples per prompt, max new tokens


# --------------------------------------------------------------------------- the fake backend


def fake_response(prompt: list[int], k: int, version: int, max_new: int) -> tuple[list[int], list[float], str]:
    """Sample ``k`` of ``prompt`` under weights ``version``: (tokens, logprobs, finish reason).
    Lengths vary from 1 to ``max_new``; shorter ones end in EOS ("stop"), the longest is cut off."""
    length = 1 + (sum(prompt) + k + version) % max_new
    tokens = [3 + (7 * sum(prompt) + 5 * k + 3 * t + 11 * version) % (VOCAB - 3) for t in range(length)]
    if length < max_new:
        tokens[-1] = EOS
    logprobs = [-0.25 - 0.125 * t - 0.0625 * version for t in range(length)]
    return tokens, logprobs, "stop" if length < max_new else "length"


class FakeBackend:
    """Meets the contract with no engine behind it; ``events`` lists what it was asked to do."""

    def __init__(self, spec: RolloutSpec, seed: int) -> None:
        self.spec, self.seed = spec, seed
        self.weights: dict[str, torch.Tensor] = {}
        self.events: list = []
        self.group = None

    @staticmethod
    def process_env(spec: RolloutSpec) -> dict[str, str]:
        return {"FAKE_ENGINE_THREADS": str(spec.threads)}

    @property
    def version(self) -> int:
        return int(self.weights["w"].flatten()[0]) if self.weights else 0

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Generation:
        self.events.append(("generate", len(prompt_ids), self.version))
        gen = Generation([], [], [], [], [])
        for i, prompt in enumerate(prompt_ids):
            for k in range(spec.n):
                tokens, logprobs, reason = fake_response(prompt, k, self.version, spec.max_new_tokens)
                gen.prompt_ids.append(list(prompt))
                gen.response_ids.append(tokens)
                gen.logprobs.append(logprobs if spec.logprobs else [math.nan] * len(tokens))
                gen.finish_reasons.append(reason)
                gen.prompt_index.append(i)
        return gen

    def init_sync_group(self, master_addr: str, master_port: int, rank: int, world_size: int,
                        backend: str, timeout_s: float) -> None:
        destroy_sync_group(self.group)
        self.group, self.timeout_s = None, timeout_s
        self.group = new_sync_group(master_addr, master_port, rank, world_size, backend, timeout_s)
        self.events.append(("join", rank, world_size))

    def receive_broadcast(self, buckets, partial: bool) -> int:
        for name, tensor in receive_buckets(self.group, buckets, torch.device("cpu"), self.timeout_s):
            self.weights[name] = tensor.clone()
        self.events.append("receive")
        return sum(b.nbytes for b in buckets)

    def load_arrays(self, buckets, arrays, partial: bool) -> int:
        for array, bucket in zip(arrays, buckets):
            for name, tensor in from_array(array, bucket, torch.device("cpu")):
                self.weights[name] = tensor.clone()
        self.events.append("load")
        return sum(b.nbytes for b in buckets)

    def reset_cache(self) -> None:
        self.events.append("reset")

    def pause(self) -> PauseState:
        self.events.append("pause")
        return PauseState(paused=True, memory_freed=False, note="fake: nothing to free")

    def resume(self) -> PauseState:
        self.events.append("resume")
        return PauseState(paused=False, memory_freed=False, note="fake")


@pytest.fixture
def fake_backend():
    register_backend(FAKE, FakeBackend)
    yield FakeBackend
    unregister_backend(FAKE)


def _config(transport: str = "object_store", **rollout):
    return config_from_dict({
        "seed": 3,
        "rollout": {"prompts_per_iteration": B, "samples_per_prompt": N, "max_new_tokens": R, "num_engines": 2,
                    **rollout},
        "ppo": {"mini_batches": 1},
        "learner": {"num_ranks": 1, "micro_batch_size": B * N},
        "sync": {"transport": transport, "check_logprobs_every": 1},
    })


def _engine(cfg, index: int = 0, backend: str = FAKE) -> RolloutEngine:
    # Keep this process's thread count: a role pins it to its spec's.
    spec = dataclasses.replace(RolloutSpec.from_config(cfg), backend=backend, threads=torch.get_num_threads())
    return RolloutEngine(spec, index)


# --------------------------------------------------------------------------- in-process stand-ins of the Ray side


def _together(*calls):
    """Run the calls at once (the members of a group join and broadcast together); their results."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result(timeout=60) for f in futures]


class InProcessRollout:
    """``RolloutGroup.generate`` without Ray: the same contiguous split of the prompts over the
    engines, each called with the prompts' indices in the iteration."""

    def __init__(self, engines: list[RolloutEngine]) -> None:
        self.engines = engines

    def generate(self, prompt_ids, spec):
        per = -(-len(prompt_ids) // len(self.engines))
        parts = []
        for i, engine in enumerate(self.engines):
            idx = list(range(i * per, min(len(prompt_ids), (i + 1) * per)))
            if idx:
                parts.append(engine.generate([prompt_ids[j] for j in idx], idx, spec))
        return Done(Generation.concat(parts))


class LearnersWithWeights(FakeLearners):
    """The coordinator tests' learner fake, plus a policy whose every entry is its update count."""

    def __init__(self) -> None:
        super().__init__()
        self.state = {"w": torch.zeros(2, 3), "b": torch.zeros(5, dtype=torch.bfloat16)}

    def train(self, update, iteration):
        out = super().train(update, iteration)
        for tensor in self.state.values():
            tensor += 1
        return out


class InProcessSync:
    """``WeightSync`` without Ray: learner rank 0's weights to every engine through the real bucket
    plan and transport, the engines' side through the role's methods the coordinator calls."""

    def __init__(self, learners: LearnersWithWeights, engines: list[RolloutEngine], transport: str) -> None:
        self.learners, self.engines, self.transport, self.timeout_s = learners, engines, transport, 30.0
        specs = [TensorSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in learners.state.items()]
        self.buckets = plan_buckets(specs, 16)  # 24 + 10 bytes: one bucket per tensor
        if transport == "collective":
            listener = reserve_port("127.0.0.1")
            port, world = listener.getsockname()[1], 1 + len(engines)
            self.group = _together(
                lambda: new_sync_group("127.0.0.1", port, 0, world, "gloo", self.timeout_s, listener=listener),
                *[lambda i=i, e=e: e.init_sync_group("127.0.0.1", port, i + 1, world, "gloo", self.timeout_s)
                  for i, e in enumerate(engines)])[0]

    def sync(self) -> dict[str, float]:
        tensors = [[self.learners.state[s.name] for s in b.specs] for b in self.buckets]
        if self.transport == "collective":
            _together(lambda: send_buckets(self.group, tensors, self.timeout_s),
                      *[lambda e=e: e.receive_broadcast(self.buckets, False) for e in self.engines])
        else:
            arrays = [to_array(ts) for ts in tensors]
            for engine in self.engines:
                engine.load_arrays(self.buckets, arrays, False)
        return {"sync_bytes": float(sum(b.nbytes for b in self.buckets))}


# --------------------------------------------------------------------------- the loop on the fake backend


@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_the_contract_runs_ppo_iterations(fake_backend, transport):
    cfg = _config(transport)
    engines = [_engine(cfg, i) for i in range(cfg.rollout.num_engines)]
    learners = LearnersWithWeights()
    sync = InProcessSync(learners, engines, transport)
    prompts = _prompts()
    coord = PPOCoordinator(cfg, prompts, PAD, [EOS], rollout=InProcessRollout(engines), reference=FakeReference(),
                           reward=FakeReward(), learners=learners, weight_sync=sync, put=_put)
    iterations = 3
    metrics = [coord.step() for _ in range(iterations)]

    assert [e.backend.seed for e in engines] == [cfg.seed, cfg.seed + 1000]  # each engine its own stream
    for it, (m, batch) in enumerate(zip(metrics, learners.old_calls)):
        # What the learner trained on is what the backend sampled, under the weights of the
        # previous update (version it): each sync landed before the next generation.
        drawn = [prompts.token_ids[i] for i in m["prompt_indices"]]
        expected = [fake_response(drawn[j // N], j % N, it, R) for j in range(B * N)]
        mask = batch.response_mask
        assert [batch.response_ids[j][mask[j]].tolist() for j in range(B * N)] == [e[0] for e in expected]
        assert batch.prompt_index.tolist() == [j // N for j in range(B * N)]  # the role's mapping to the iteration
        for j, (_, logprobs, reason) in enumerate(expected):
            assert batch.rollout_logprobs[j][mask[j]].tolist() == pytest.approx(logprobs)
            assert bool(batch.truncated[j]) is (reason == "length")
        assert m.get("sync_bytes") == (None if it == 0 else 24.0 + 10.0)  # no sync before the first update
    load = "receive" if transport == "collective" else "load"
    # Engine 0 takes prompts 0-1, engine 1 prompt 2; after every load the role reset the cache.
    for i, engine in enumerate(engines):
        joined = [("join", i + 1, 3)] if transport == "collective" else []
        calls = [("generate", 2 - i, v) for v in range(iterations)]
        assert engine.backend.events == joined + [calls[0], load, "reset", calls[1], load, "reset", calls[2]]
        assert {n: t.dtype for n, t in engine.backend.weights.items()} == {"w": torch.float32, "b": torch.bfloat16}
        for name, tensor in learners.state.items():  # the last sync brought update 2; the learner made 3
            assert torch.equal(engine.backend.weights[name], tensor - 1)


def test_logprobs_left_out_are_nan_and_pass_the_check(fake_backend):
    engine = _engine(_config())
    spec = SamplingSpec(n=2, max_new_tokens=R, logprobs=False)
    gen = engine.generate([[11, 12], [13]], [7, 4], spec)
    assert gen.prompt_index == [7, 7, 4, 4]
    assert all(math.isnan(x) for row in gen.logprobs for x in row)


# --------------------------------------------------------------------------- what the role adds


def test_the_role_refuses_to_sample_while_paused(fake_backend):
    engine = _engine(_config())
    state = engine.pause()
    assert (state.paused, state.memory_freed) == (True, False)
    with pytest.raises(RuntimeError, match=r"rollout-0 is paused: call resume\(\) before generate\(\)"):
        engine.generate([[11]], [0], SamplingSpec(n=1, max_new_tokens=R))
    assert engine.resume().paused is False
    assert len(engine.generate([[11]], [0], SamplingSpec(n=1, max_new_tokens=R))) == 1
    assert engine.backend.events == ["pause", "resume", ("generate", 1, 0)]  # the refused call never reached it


class _DropsASample(FakeBackend):
    def generate(self, prompt_ids, spec):
        return super().generate(prompt_ids, spec).rows(range(len(prompt_ids) * spec.n - 1))


class _TooLong(FakeBackend):
    def generate(self, prompt_ids, spec):
        gen = super().generate(prompt_ids, spec)
        gen.response_ids[1] = gen.response_ids[1] + [3] * spec.max_new_tokens
        return gen


@pytest.mark.parametrize("cls, says", [
    (_DropsASample, "expected 4 samples (2 prompts x n=2), got"),
    (_TooLong, "sample 1: "),
])
def test_the_role_stops_a_backend_that_breaks_generate(cls, says):
    register_backend(FAKE, cls)
    try:
        engine = _engine(_config())
        with pytest.raises(RuntimeError) as info:
            engine.generate([[11], [12]], [0, 1], SamplingSpec(n=2, max_new_tokens=R))
    finally:
        unregister_backend(FAKE)
    assert f"rollout-0 ({cls.__name__}) broke the RolloutBackend contract in generate: " in str(info.value)
    assert says in str(info.value)


# --------------------------------------------------------------------------- the contract and the registry


def test_a_class_that_misses_the_contract_is_refused_with_what_it_lacks():
    class Half:
        def __init__(self, spec, seed):
            pass

        def generate(self, prompts, spec):  # parameter named differently
            return Generation([], [], [], [], [])

    errors = contract_errors(Half)
    assert "generate(prompts, spec) should take (prompt_ids, spec)" in errors
    assert "no method pause()" in errors and "no method load_arrays(buckets, arrays, partial)" in errors
    with pytest.raises(TypeError, match=r"rollout backend 'half' \(.*Half\) does not meet the RolloutBackend "
                                        r"contract of rlhf_ray/backends/rollout.py: .*no method reset_cache\(\)"):
        register_backend("half", Half)
    assert contract_errors(FakeBackend) == [] and isinstance(FakeBackend(None, 0), RolloutBackend)


def test_an_unknown_backend_names_the_known_ones():
    with pytest.raises(ValueError, match=r"rollout backend 'sglang' does not exist; the backends are \['vllm'\]"):
        backend_class("sglang")


def test_the_process_env_comes_from_the_named_backend(fake_backend):
    spec = dataclasses.replace(RolloutSpec.from_config(_config()), backend=FAKE, threads=3)
    assert rollout_env(spec) == {"FAKE_ENGINE_THREADS": "3"}


def test_the_vllm_backend_meets_the_contract_without_importing_vllm():
    """Structural check in a fresh interpreter that refuses to import vllm: the class is found by
    name, has every method with the contract's parameters, and its process env reads rollout.vllm."""
    code = textwrap.dedent("""
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "vllm":
                    raise ImportError("vllm is blocked here")
                return None

        sys.meta_path.insert(0, Blocker())
        from rlhf_ray.backends.rollout import RolloutSpec, backend_class, contract_errors, rollout_env
        from rlhf_ray.backends.vllm import VLLMBackend
        from rlhf_ray.config import load_config

        assert backend_class("vllm") is VLLMBackend
        assert contract_errors(VLLMBackend) == [], contract_errors(VLLMBackend)
        spec = RolloutSpec.from_config(load_config(None, {"rollout.vllm.kv_cache_gib": "3"}))
        assert rollout_env(spec)["VLLM_CPU_KVCACHE_SPACE"] == "3", rollout_env(spec)
        print("OK")
        """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def test_the_config_choices_are_the_backends_table():
    """One home per choice: rollout.backend's Literal lists exactly the backends of BACKENDS, and
    every subsection of the rollout section belongs to one of them (what only it reads)."""
    hints = typing.get_type_hints(RolloutConfig)
    assert choices_of(hints["backend"]) == tuple(BACKENDS)
    subsections = [f.name for f in dataclasses.fields(RolloutConfig) if is_config_class(hints[f.name])]
    assert subsections and set(subsections) <= set(BACKENDS)


def test_the_spec_carries_the_named_backends_subsection():
    cfg = config_from_dict({"rollout": {"vllm": {"enforce_eager": False}}})
    spec = RolloutSpec.from_config(cfg)
    assert spec.backend == "vllm" and spec.options is cfg.rollout.vllm and spec.options.enforce_eager is False
