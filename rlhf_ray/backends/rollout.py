"""The rollout-engine contract: what the rollout role needs from an inference engine.

``RolloutEngine`` (``workers/rollout.py``) is the role the coordinator talks to; it owns the
role's rules (an engine's seed, mapping prompts back to the iteration's order, checking what the
engine returned, resetting the cache after every weight load, refusing to sample while paused)
and leaves the engine work to one :class:`RolloutBackend`, picked by ``rollout.backend``:

    coordinator --(generate, init_sync_group, receive_broadcast, load_arrays)--> RolloutEngine
    RolloutEngine --(generate, receive/load, reset_cache, pause/resume)--> RolloutBackend
    RolloutBackend: VLLMBackend (backends/vllm.py), or a test's fake

A backend is built from a :class:`RolloutSpec` (backend-neutral settings plus its own config
subsection, ``rollout.<backend>``) and a seed. :func:`backend_class` finds it by name in
:data:`BACKENDS` (or among those added with :func:`register_backend`) and checks that it has
every method of the contract with the contract's parameters (:func:`contract_errors`).
Adding a backend: one module with its class, one line in :data:`BACKENDS`, its name in
``RolloutConfig.backend``'s ``Literal`` (``tests/unit/test_rollout_backend.py`` fails when the
two disagree) and, if it has settings of its own, a subsection of ``RolloutConfig`` named like it.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rlhf_ray.batch import Generation
from rlhf_ray.config import Config
from rlhf_ray.weight_sync.plan import Bucket


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
    stop: tuple[str, ...] = ()  # strings that end a response; the tokens completing one are kept

    @staticmethod
    def from_config(cfg: Config) -> "SamplingSpec":
        r = cfg.rollout
        return SamplingSpec(r.samples_per_prompt, r.max_new_tokens, r.temperature, r.top_p, r.top_k,
                            tuple(r.stop_token_ids), stop=tuple(r.stop))


@dataclass(frozen=True)
class RolloutSpec:
    """What a rollout engine is built from: no engine's names, except inside ``options``."""

    backend: str  # rollout.backend: the key of BACKENDS that serves the role
    model_path: str  # model.path: the engines start from the policy checkpoint
    dtype: str  # model.dtype; a backend may run float32 where bfloat16 does not apply (vLLM: on the CPU)
    seed: int  # the run's seed; engine i samples with seed + 1000 * i
    max_model_len: int  # rollout.max_model_len: prompt + response tokens an engine must hold
    tensor_parallel_size: int  # rollout.tensor_parallel_size: devices one engine shards its model over
    threads: int  # resources.rollout.threads
    num_gpus: float  # resources.rollout.num_gpus (0: the engine runs on the CPU)
    options: Any = None  # the backend's own subsection rollout.<backend> (rollout.vllm), None if it has none

    @staticmethod
    def from_config(cfg: Config) -> "RolloutSpec":
        r, res = cfg.rollout, cfg.resources.rollout
        return RolloutSpec(r.backend, cfg.model.path, cfg.model.dtype, cfg.seed, r.max_model_len,
                           r.tensor_parallel_size, res.threads, res.num_gpus, getattr(r, r.backend, None))


@dataclass(frozen=True)
class PauseState:
    """What a backend's ``pause`` or ``resume`` left the engine in, and how it got there."""

    paused: bool  # the engine schedules no work until resume
    memory_freed: bool  # its weights / KV cache memory were released for others (e.g. a learner on the same GPU)
    note: str  # what the backend did, in words (for logs; e.g. why memory was not freed)


@runtime_checkable
class RolloutBackend(Protocol):
    """An inference engine behind the rollout role, built as ``cls(spec: RolloutSpec, seed: int)``.

    It may assume: one call at a time (the role's Ray actor runs calls one after another, so no
    generate overlaps a weight load); the process environment of :meth:`process_env` was set
    before the process started; ``spec`` passed config validation. The role, not the backend,
    resets the cache after each load and refuses to sample while paused.
    """

    @staticmethod
    def process_env(spec: RolloutSpec) -> dict[str, str]:
        """Environment variables the engine's process needs, set before it starts (the coordinator
        passes them in the actor's ``runtime_env``; an in-process caller sets ``os.environ``
        before building the backend). Called where the run is driven, so it must not start the
        engine or import its library. Returns ``{}`` if there are none."""
        ...

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Generation:
        """Sample ``spec.n`` responses to each prompt (token ids, no text in or out). Returns a
        ``Generation`` with ``len(prompt_ids) * spec.n`` samples grouped by prompt, in prompt
        order: ``prompt_index`` is the prompt's position in ``prompt_ids`` (the role maps it to the
        iteration's), ``prompt_ids`` that prompt's ids, ``response_ids`` at most
        ``spec.max_new_tokens`` ids including a final EOS or stop token (or the tokens that complete a
        stop string of ``spec.stop``: no token is cut, so the ids are exactly the sampled ones), ``logprobs`` one per
        response token, the log-probability of the sampled token under the distribution it was
        sampled from (after temperature; NaN everywhere when ``spec.logprobs`` is off, and a
        backend may then skip computing them), ``finish_reasons`` "stop" (EOS, stop token or stop string) or
        "length" (cut off at ``spec.max_new_tokens``). Sampling is full-softmax at
        ``spec.temperature`` (``top_p`` 1, ``top_k`` -1: validation refuses others) and reproducible
        for a given seed, weights and prompts."""
        ...

    def init_sync_group(self, master_addr: str, master_port: int, rank: int, world_size: int,
                        backend: str, timeout_s: float) -> None:
        """Join the weight-sync broadcast group (``rlhf_ray.weight_sync.transport.new_sync_group``)
        as group rank ``rank`` of ``world_size`` (learner rank 0 is rank 0 and hosts the store at
        ``master_addr:master_port``); ``backend`` is "gloo" or "nccl". Every member calls this at
        the same time. A group this backend joined before is dropped first
        (``destroy_sync_group``): the group is rebuilt when an engine or the learners are
        replaced. Each process that holds a part of the model (tensor-parallel workers) would need
        a rank of its own, which is why validation refuses tensor parallelism with this transport."""
        ...

    def receive_broadcast(self, buckets: list[Bucket], partial: bool) -> int:
        """Receive one sync over the group from :meth:`init_sync_group`: one broadcast per bucket
        of ``buckets`` (the plan of ``rlhf_ray.weight_sync.plan``, in order; consume them with
        ``transport.receive_buckets``, which keeps two in flight) and load those tensors in place
        of the engine's weights, by checkpoint name (a backend fuses or shards them as its model
        needs). ``partial``: the plan leaves layers out (LoRA sends only the adapted layers); the
        others keep their weights. Returns the bytes received. Must consume every bucket, or the
        sender waits until ``timeout_s``."""
        ...

    def load_arrays(self, buckets: list[Bucket], arrays: list[np.ndarray], partial: bool) -> int:
        """Load one sync given as one flat numpy array per bucket (the object-store transport:
        ``arrays[i]`` is ``transport.to_array`` of ``buckets[i]``'s tensors; turn it back with
        ``transport.from_array``). The arrays may be read-only views of shared memory, so copy
        before writing. ``partial`` as in :meth:`receive_broadcast`. Returns the bytes loaded."""
        ...

    def reset_cache(self) -> None:
        """Forget every cached result computed with the old weights (prefix / KV cache), so the
        next generate runs entirely on the weights just loaded. The role calls it after each
        load. Raises if the cache could not be dropped; a backend without a cache does nothing."""
        ...

    def pause(self) -> PauseState:
        """Stop scheduling work until :meth:`resume`, without losing the model (e.g. while weights
        change, or to lend memory to a colocated learner). Returns what it did: ``paused`` and
        whether memory was freed; a backend that cannot do either says so in ``note`` and
        returns ``paused=False``."""
        ...

    def resume(self) -> PauseState:
        """Undo :meth:`pause` (restoring freed memory first). Returns the state afterwards
        (``paused=False`` once the engine takes work again)."""
        ...


CONTRACT_METHODS = ("process_env", "generate", "init_sync_group", "receive_broadcast", "load_arrays",
                    "reset_cache", "pause", "resume")

# The backends rollout.backend can name, as "module:Class", imported only when picked: building
# the table must not import an engine's library (or a module that imports this one).
BACKENDS: dict[str, str] = {"vllm": "rlhf_ray.backends.vllm:VLLMBackend"}

_registered: dict[str, type] = {}


def register_backend(name: str, cls: type) -> None:
    """Make ``cls`` available as backend ``name`` in this process (e.g. a test's fake); it must
    meet the contract. The config accepts only the names of :data:`BACKENDS`, so a registered
    backend is reached through a :class:`RolloutSpec` built directly."""
    _check(name, cls)
    _registered[name] = cls


def unregister_backend(name: str) -> None:
    _registered.pop(name, None)


def backend_class(name: str) -> type:
    """The class of backend ``name``: a registered one, else the entry of :data:`BACKENDS`."""
    if name in _registered:
        return _registered[name]
    if name not in BACKENDS:
        known = sorted({*BACKENDS, *_registered})
        raise ValueError(f"rollout backend {name!r} does not exist; the backends are {known}. Set "
                         "--rollout.backend to one of them, or add one (rlhf_ray/backends/rollout.py says how).")
    module, _, attr = BACKENDS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    _check(name, cls)
    return cls


def build_backend(spec: RolloutSpec, seed: int) -> RolloutBackend:
    """The backend ``spec.backend``, built for ``spec`` with sampling seed ``seed``."""
    return backend_class(spec.backend)(spec, seed)


def rollout_env(spec: RolloutSpec) -> dict[str, str]:
    """The process environment of an engine of ``spec`` (:meth:`RolloutBackend.process_env`)."""
    return backend_class(spec.backend).process_env(spec)


def _parameters(func: Any) -> list[str]:
    return [p for p in inspect.signature(func).parameters if p != "self"]


def contract_errors(cls: type) -> list[str]:
    """How ``cls`` misses the contract: each method of :class:`RolloutBackend` it lacks or whose
    parameters differ by name or order, and a constructor that does not take (spec, seed)."""
    errors = []
    for name in CONTRACT_METHODS:
        want = _parameters(getattr(RolloutBackend, name))
        have = getattr(cls, name, None)
        if not callable(have):
            errors.append(f"no method {name}({', '.join(want)})")
        elif _parameters(have) != want:
            errors.append(f"{name}({', '.join(_parameters(have))}) should take ({', '.join(want)})")
    if _parameters(cls.__init__)[:2] != ["spec", "seed"]:
        errors.append(f"its constructor takes ({', '.join(_parameters(cls.__init__))}), not (spec, seed)")
    return errors


def _check(name: str, cls: type) -> None:
    errors = contract_errors(cls)
    if errors:
        raise TypeError(f"rollout backend {name!r} ({cls.__module__}.{cls.__qualname__}) does not meet the "
                        "RolloutBackend contract of rlhf_ray/backends/rollout.py: " + "; ".join(errors) + ".")


def check_generation(gen: Generation, num_prompts: int, spec: SamplingSpec, who: str) -> None:
    """Raise ``RuntimeError`` naming ``who`` if ``gen`` is not what :meth:`RolloutBackend.generate`
    promises for ``num_prompts`` prompts under ``spec``: a broken engine stops at its boundary
    instead of as a shape error in the learner. Costs one pass over the samples. NaN or inf
    logprobs pass: the coordinator quarantines such samples itself."""
    problems = []
    fields = {"prompt_ids": gen.prompt_ids, "logprobs": gen.logprobs, "finish_reasons": gen.finish_reasons,
              "prompt_index": gen.prompt_index}
    expected = num_prompts * spec.n
    counts = {name: len(values) for name, values in {"response_ids": gen.response_ids, **fields}.items()}
    if set(counts.values()) != {expected}:
        problems.append(f"expected {expected} samples ({num_prompts} prompts x n={spec.n}), got {counts}")
    elif list(gen.prompt_index) != [i for i in range(num_prompts) for _ in range(spec.n)]:
        problems.append("samples are not grouped by prompt in prompt order (prompt_index should be "
                        f"0 x{spec.n}, 1 x{spec.n}, ...; got {list(gen.prompt_index)[:2 * spec.n]}...)")
    else:
        for j, (tokens, logprobs, reason) in enumerate(zip(gen.response_ids, gen.logprobs, gen.finish_reasons)):
            if len(tokens) > spec.max_new_tokens or len(logprobs) != len(tokens) or reason not in ("stop", "length"):
                problems.append(f"sample {j}: {len(tokens)} tokens (at most {spec.max_new_tokens}), "
                                f"{len(logprobs)} logprobs (one per token), finish reason {reason!r} "
                                "(stop or length)")
                break
    if problems:
        raise RuntimeError(f"{who} broke the RolloutBackend contract in generate: {'; '.join(problems)}.")
