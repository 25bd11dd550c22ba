"""The vLLM backend behind the real rollout role, in this process (no Ray): generate, pause and
resume (vLLM's level-0 sleep), and a weight load from flat arrays while paused, followed by the
role's cache reset.

Greedy decoding of the tiny Llama; loading the checkpoint's own weights must leave the tokens
unchanged, loading them with the final norm negated (logits negated) must change them.
Skipped when vllm is not importable.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

from safetensors.torch import load_file  # noqa: E402

from rlhf_ray.backends.rollout import RolloutSpec, SamplingSpec, rollout_env  # noqa: E402
from rlhf_ray.weight_sync.plan import TensorSpec, dtype_name, plan_buckets  # noqa: E402
from rlhf_ray.weight_sync.transport import to_array  # noqa: E402
from rlhf_ray.workers.rollout import RolloutEngine  # noqa: E402
from tests.integration.conftest import small_config  # noqa: E402

pytestmark = pytest.mark.integration

GREEDY = SamplingSpec(n=1, max_new_tokens=8, temperature=0.0, logprobs=False)
PROMPTS = [[1, 40, 41, 42, 43], [1, 100, 7, 300]]


def _arrays(weights: dict[str, torch.Tensor]):
    specs = [TensorSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in weights.items()]
    buckets = plan_buckets(specs, 1 << 20)
    return buckets, [to_array([weights[s.name] for s in b.specs]) for b in buckets]


def test_vllm_backend_pause_load_resume(tiny_llama, monkeypatch):
    cfg = small_config(tiny_llama)
    spec = dataclasses.replace(RolloutSpec.from_config(cfg), threads=torch.get_num_threads())
    for key, value in rollout_env(spec).items():
        monkeypatch.setenv(key, value)  # before the engine starts, as the actor's runtime_env sets them
    engine = RolloutEngine(spec, 0)
    try:
        before = engine.generate(PROMPTS, [0, 1], GREEDY)
        assert before.prompt_index == [0, 1] and all(0 < len(r) <= 8 for r in before.response_ids)

        state = engine.pause()
        assert (state.paused, state.memory_freed) == (True, False), state
        with pytest.raises(RuntimeError, match="is paused"):
            engine.generate(PROMPTS, [0, 1], GREEDY)
        weights = load_file(os.path.join(tiny_llama, "model.safetensors"))
        buckets, arrays = _arrays(weights)
        out = engine.load_arrays(buckets, arrays)  # while paused: the load and the cache reset still run
        assert out["bytes"] == sum(b.nbytes for b in buckets)
        assert engine.resume().paused is False

        same = engine.generate(PROMPTS, [0, 1], GREEDY)
        assert same.response_ids == before.response_ids

        flipped = dict(weights, **{"model.norm.weight": -weights["model.norm.weight"]})
        engine.load_arrays(*_arrays(flipped))
        changed = engine.generate(PROMPTS, [0, 1], GREEDY)
        assert changed.response_ids != before.response_ids
    finally:
        del engine
