"""Rollout role: one inference engine that samples responses and receives new policy weights.

``RolloutEngine`` is a plain class (usable without Ray, e.g. in benchmarks and the unit tests'
fake-backend loop); its Ray shell ``RolloutActor`` is in ``workers/actors.py``. The engine
itself is the ``RolloutBackend`` that ``rollout.backend`` names (``backends/rollout.py``: the
contract, and vLLM's implementation in ``backends/vllm.py``); this role keeps what is the same
for every engine: each engine's seed, prompt order, the check of what the engine returned, the
cache reset after every weight load, and no sampling while paused.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from rlhf_ray.backends.rollout import PauseState, RolloutSpec, SamplingSpec, build_backend, check_generation
from rlhf_ray.batch import Generation
from rlhf_ray.weight_sync.plan import Bucket
from rlhf_ray.workers.base import RoleBase

__all__ = ["RolloutEngine", "SamplingSpec"]  # SamplingSpec: the coordinator imports it from here


class RolloutEngine(RoleBase):
    role = "rollout"

    def __init__(self, spec: RolloutSpec, index: int = 0, model_path: str | None = None) -> None:
        super().__init__(index, spec.threads)
        self.model_path = model_path or spec.model_path
        self.backend = build_backend(dataclasses.replace(spec, model_path=self.model_path),
                                     seed=spec.seed + 1000 * index)
        self.paused = False

    def generate(self, prompt_ids: list[list[int]], prompt_index: list[int], spec: SamplingSpec) -> Generation:
        """Sample ``spec.n`` responses per prompt; ``prompt_index[i]`` is prompt i's index in the
        iteration and becomes its samples' group id. Logprobs are at the sampling temperature (NaN
        when ``spec.logprobs`` is off: the engine may then skip computing them)."""
        if self.paused:
            raise RuntimeError(f"{self.label} is paused: call resume() before generate().")
        gen = self.backend.generate(prompt_ids, spec)
        check_generation(gen, len(prompt_ids), spec, f"{self.label} ({type(self.backend).__name__})")
        gen.prompt_index = [prompt_index[i] for i in gen.prompt_index]
        return gen

    # ------------------------------------------------------------------ weight sync
    def init_sync_group(self, master_addr: str, master_port: int, rank: int, world_size: int,
                        backend: str, timeout_s: float) -> None:
        self.backend.init_sync_group(master_addr, master_port, rank, world_size, backend, timeout_s)

    def receive_broadcast(self, buckets: list[Bucket], partial: bool = False) -> dict[str, float]:
        """Receive one sync's buckets over the collective group and load them in place.
        ``partial``: the learner's plan leaves layers out (``sync_is_partial``)."""
        t0 = time.perf_counter()
        nbytes = self.backend.receive_broadcast(buckets, partial)
        self.backend.reset_cache()  # cached KV blocks were computed with the old weights
        return {"bytes": float(nbytes), "seconds": time.perf_counter() - t0}

    def load_arrays(self, buckets: list[Bucket], array_refs: list, partial: bool = False) -> dict[str, float]:
        """Load one sync's weights from flat arrays in the object store (one per bucket; an
        in-process caller may pass the numpy arrays themselves); ``partial`` as in
        ``receive_broadcast``."""
        t0 = time.perf_counter()
        nbytes = self.backend.load_arrays(buckets, _fetch(array_refs), partial)
        self.backend.reset_cache()
        return {"bytes": float(nbytes), "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ pause
    def pause(self) -> PauseState:
        """Stop the engine taking work (``generate`` refuses until :meth:`resume`); what the
        backend could do, e.g. whether it freed memory, is in the returned state."""
        state = self.backend.pause()
        self.paused = True
        return state

    def resume(self) -> PauseState:
        state = self.backend.resume()
        self.paused = state.paused
        return state


def _fetch(array_refs: list) -> list[np.ndarray]:
    """The arrays behind ``array_refs``: object-store references are read with ``ray.get`` (on this
    node: read-only views of shared memory, no copy); numpy arrays pass as they are."""
    if all(isinstance(a, np.ndarray) for a in array_refs):
        return list(array_refs)
    import ray

    return ray.get(array_refs)
