"""vLLM specifics: engine arguments and the weight receiver that runs inside vLLM's worker.

The receiver is a ``worker_extension_cls``: vLLM mixes it into its worker class, so its
methods run in the process that holds the model, whether the engine runs in-process
(our CPU default) or in separate worker processes (GPU, tensor parallel). The rollout
actor reaches them through ``LLM.collective_rpc``.

A sync is one ``reload_weights`` call fed by a generator over the buckets as they arrive:
vLLM fuses checkpoint tensors (q/k/v into qkv_proj, gate/up into gate_up_proj) and its
in-place reload processes (on CPU: repacks for oneDNN) a layer once all of its pieces have
arrived, so one reload per bucket would leave a layer split across buckets half loaded. The
generator keeps the next bucket's broadcast in flight while vLLM processes the current one,
and at most two buckets are staged at a time.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch

from rlhf_ray.config import Config
from rlhf_ray.weight_sync.plan import from_wire
from rlhf_ray.weight_sync.transport import from_array, new_sync_group, receive_buckets

RECEIVER_CLS = "rlhf_ray.backends.vllm.WeightReceiver"


def engine_env(cfg: Config) -> dict[str, str]:
    """Environment variables the engine's process needs (set through the actor's runtime_env)."""
    threads = str(cfg.resources.rollout.threads)
    env = {
        # In-process engine: ~2 s start instead of ~13 s on CPU, and no extra processes.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": threads,
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(cfg.rollout.kv_cache_gib))),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    return env


def engine_kwargs(cfg: Config, model_path: str, seed: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` from the config."""
    r = cfg.rollout
    on_gpu = torch.cuda.is_available() and cfg.resources.rollout.num_gpus > 0
    kwargs: dict[str, Any] = dict(
        model=model_path,
        dtype="bfloat16" if (on_gpu and cfg.model.dtype == "bfloat16") else "float32",
        enforce_eager=r.enforce_eager,
        max_model_len=r.max_model_len,
        seed=seed,
        # Logprobs after temperature/top-k/top-p: the distribution we actually sampled from,
        # which is what the learner's logprobs at the same temperature are compared with.
        logprobs_mode="processed_logprobs",
        worker_extension_cls=RECEIVER_CLS,
        enable_prefix_caching=True,
        tensor_parallel_size=r.tensor_parallel_size,
    )
    if on_gpu:
        kwargs["gpu_memory_utilization"] = r.gpu_memory_utilization
    else:
        kwargs["distributed_executor_backend"] = "uni"
    return kwargs


class WeightReceiver:
    """Mixed into vLLM's worker. Methods are prefixed ``rlhf_`` to avoid clashing with vLLM's."""

    def _rlhf_device(self) -> torch.device:
        return next(self.model_runner.model.parameters()).device  # type: ignore[attr-defined]

    def rlhf_init_sync_group(self, master_addr: str, master_port: int, rank: int, world_size: int,
                             backend: str, timeout_s: float) -> None:
        self._rlhf_group = new_sync_group(master_addr, master_port, rank, world_size, backend, timeout_s)
        self._rlhf_timeout = timeout_s

    def rlhf_receive_buckets(self, wire_plan: list) -> int:
        """Receive every bucket of one sync (plan in ``to_wire`` form) from the broadcast group
        and load them in one in-place reload that consumes the buckets as they arrive. Returns
        bytes received."""
        buckets = from_wire(wire_plan)
        self._rlhf_load(receive_buckets(self._rlhf_group, buckets, self._rlhf_device(), self._rlhf_timeout))
        return sum(b.nbytes for b in buckets)

    def rlhf_load_arrays(self, wire_plan: list, arrays: list) -> int:
        """Load a sync's weights given as one flat array per bucket (object-store transport)."""
        buckets, device = from_wire(wire_plan), self._rlhf_device()
        self._rlhf_load(item for array, bucket in zip(arrays, buckets) for item in from_array(array, bucket, device))
        return sum(b.nbytes for b in buckets)

    def _rlhf_load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]

    def rlhf_weight_checksum(self) -> float:
        """Sum of all parameters: a cheap fingerprint to compare across engines in tests."""
        return float(sum(p.detach().double().sum() for p in self.model_runner.model.parameters()))  # type: ignore[attr-defined]
