"""Rollout role: one vLLM engine that samples responses and receives new policy weights.

``RolloutEngine`` is a plain class (usable without Ray, e.g. in benchmarks); its Ray shell
``RolloutActor`` is in ``workers/actors.py``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from rlhf_ray.backends.vllm import EngineSpec, engine_kwargs
from rlhf_ray.batch import Generation
from rlhf_ray.config import Config
from rlhf_ray.weight_sync.plan import Bucket, to_wire
from rlhf_ray.workers.base import RoleBase


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling settings of one generate call."""

    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = True  # return each sampled token's logprob (else NaN in their place)

    @staticmethod
    def from_config(cfg: Config) -> "SamplingSpec":
        r = cfg.rollout
        return SamplingSpec(r.samples_per_prompt, r.max_new_tokens, r.temperature, r.top_p, r.top_k,
                            tuple(r.stop_token_ids))


class _QuietBenignReload(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" on every sync: the
    rotary cache is a derived buffer with no checkpoint tensor, and vLLM restores it itself
    (checked: logprobs match the learner to ~1e-7 after a sync). Drop just that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


class RolloutEngine(RoleBase):
    role = "rollout"

    def __init__(self, spec: EngineSpec, index: int = 0, model_path: str | None = None) -> None:
        super().__init__(index, spec.threads)
        from vllm import LLM

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QuietBenignReload())
        self.model_path = model_path or spec.model_path
        self.llm = LLM(**engine_kwargs(spec, self.model_path, seed=spec.seed + 1000 * index))

    def generate(self, prompt_ids: list[list[int]], prompt_index: list[int], spec: SamplingSpec) -> Generation:
        """Sample ``spec.n`` responses per prompt; logprobs are at the sampling temperature (NaN when
        ``spec.logprobs`` is off: vLLM then skips computing them)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=spec.n, max_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
            top_k=spec.top_k, stop_token_ids=list(spec.stop_token_ids) or None,
            logprobs=0 if spec.logprobs else None,
            detokenize=False,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                    use_tqdm=False)
        gen = Generation([], [], [], [], [])
        for p_ids, p_idx, out in zip(prompt_ids, prompt_index, outputs):
            for completion in out.outputs:
                tokens = list(completion.token_ids)
                gen.prompt_ids.append(list(p_ids))
                gen.response_ids.append(tokens)
                if spec.logprobs:
                    gen.logprobs.append([step[tok].logprob for step, tok in zip(completion.logprobs, tokens)])
                else:
                    gen.logprobs.append([math.nan] * len(tokens))
                gen.finish_reasons.append("length" if completion.finish_reason == "length" else "stop")
                gen.prompt_index.append(p_idx)
        return gen

    # ------------------------------------------------------------------ weight sync
    def init_sync_group(self, master_addr: str, master_port: int, rank: int, world_size: int,
                        backend: str, timeout_s: float) -> None:
        self.llm.collective_rpc("rlhf_init_sync_group",
                                args=(master_addr, master_port, rank, world_size, backend, timeout_s))

    def receive_broadcast(self, buckets: list[Bucket], partial: bool = False) -> dict[str, float]:
        """Receive one sync's buckets over the collective group and load them in place.
        ``partial``: the learner's plan leaves layers out (``sync_is_partial``)."""
        t0 = time.perf_counter()
        nbytes = self.llm.collective_rpc("rlhf_receive_buckets", args=(to_wire(buckets), partial))[0]
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return {"bytes": float(nbytes), "seconds": time.perf_counter() - t0}

    def load_arrays(self, buckets: list[Bucket], array_refs: list, partial: bool = False) -> dict[str, float]:
        """Load one sync's weights from flat arrays in the object store (one per bucket);
        ``partial`` as in ``receive_broadcast``."""
        import ray

        t0 = time.perf_counter()
        arrays = ray.get(array_refs)  # on this node: read-only views of shared memory, no copy
        nbytes = self.llm.collective_rpc("rlhf_load_arrays", args=(to_wire(buckets), arrays, partial))[0]
        self.llm.reset_prefix_cache()
        return {"bytes": float(nbytes), "seconds": time.perf_counter() - t0}

