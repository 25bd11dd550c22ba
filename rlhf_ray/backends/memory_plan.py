"""The memory plan: each GPU role's estimate (``rlhf_ray.backends.memory``) against the GPU's size,
before Ray starts or any GPU is taken.

The GPU size comes from ``resources.gpu_memory_gib``, else from the GPUs of the machine the
launcher runs on (``torch.cuda.get_device_properties``, asked in a child process so that no CUDA
context stays in the launcher), else it is unknown: the plan is then printed without a verdict.
With a size, a role whose estimate exceeds its share of a GPU (``resources.<role>.num_gpus``,
at most one GPU) is refused, naming its largest term and the options that would make it fit,
each tried on a copy of the config. ``--dry-run`` prints the plan after the placement plan; a
real launch prints one line and refuses the same plans in its pre-flight. A CPU-only config
(no role with ``num_gpus > 0``) has no plan.

What it leaves out: host memory (offloaded optimiser state, pinned buffers), other processes on
the GPU, and the allocator's fragmentation (an estimate within a few percent of the GPU is tight).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

from rlhf_ray.backends.memory import CUDA_GRAPHS, GIB, ModelShape, RoleEstimate, role_estimates
from rlhf_ray.config import Config, ConfigError, resolve
from rlhf_ray.config.episodes import episode_tokens


class MemoryPlanError(ValueError):
    """A plan with a role that cannot fit its GPU. The message names the role, the term and the fixes."""


_PROBE = ("import torch\n"
          "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
          "if n:\n"
          "    props = [torch.cuda.get_device_properties(i) for i in range(n)]\n"
          "    print(min(p.total_memory for p in props), props[0].name, sep='\\t')\n")


def detect_gpu(timeout_s: float = 120.0) -> tuple[int, str] | None:
    """(bytes, name) of the smallest CUDA device of this machine, or None where there is none.
    Asked in a child process (the launcher keeps no CUDA context on a GPU a role will use);
    skipped without a starting process where the machine has no GPU device file or nvidia-smi."""
    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd") or shutil.which("nvidia-smi")):
        return None
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = done.stdout.strip().split("\t")
    if done.returncode != 0 or len(fields) != 2 or not fields[0].isdigit():
        return None
    return int(fields[0]), fields[1]


def gpu_size(cfg: Config, detect: Callable[[], tuple[int, str] | None] | None = None) -> tuple[int | None, str]:
    """(bytes of one GPU or None, where that came from): resources.gpu_memory_gib, else ``detect()``
    (default :func:`detect_gpu`)."""
    if cfg.resources.gpu_memory_gib is not None:
        return int(cfg.resources.gpu_memory_gib * GIB), "--resources.gpu_memory_gib"
    found = (detect or detect_gpu)()
    if found is None:
        return None, "unknown: no GPU visible to the launcher"
    return found[0], f"{found[1]} on the launcher's machine"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _set(obj: Any, dotted: str, value: Any) -> Any:
    """A copy of the frozen tree ``obj`` with ``dotted`` set to ``value``."""
    head, _, rest = dotted.partition(".")
    return dataclasses.replace(obj, **{head: _set(getattr(obj, head), rest, value) if rest else value})


def _candidates(cfg: Config, role: str, term: str, gpu_bytes: int) -> list[tuple[str, str, Any]]:
    """(flag as printed, dotted key, value): the options that shrink ``role``'s memory."""
    lrn, m, r = cfg.learner, cfg.model, cfg.rollout
    longest = cfg.data.max_prompt_tokens + episode_tokens(cfg)
    out: list[tuple[str, str, Any]] = []
    if role == "learner":
        if not lrn.offload_optimizer:
            out.append(("--learner.offload_optimizer true", "learner.offload_optimizer", True))
        if lrn.zero_stage < 3:
            out.append(("--learner.zero_stage 3", "learner.zero_stage", 3))
        if m.gradient_checkpointing is not True:
            out.append(("--model.gradient_checkpointing true", "model.gradient_checkpointing", True))
        if lrn.micro_batch_tokens and lrn.micro_batch_tokens // 2 >= longest:
            half = lrn.micro_batch_tokens // 2
            out.append((f"a smaller --learner.micro_batch_tokens ({half})", "learner.micro_batch_tokens", half))
        elif not lrn.micro_batch_tokens and lrn.micro_batch_size > 1:
            half = lrn.micro_batch_size // 2
            out.append((f"a smaller --learner.micro_batch_size ({half})", "learner.micro_batch_size", half))
        if lrn.zero_stage >= 1 or lrn.backend == "fsdp2":
            out.append((f"more --learner.num_ranks ({2 * lrn.num_ranks})", "learner.num_ranks", 2 * lrn.num_ranks))
        if term == "logits" and lrn.logprob_chunk > 256:
            out.append((f"a smaller --learner.logprob_chunk ({lrn.logprob_chunk // 2})", "learner.logprob_chunk",
                        lrn.logprob_chunk // 2))
    elif role == "rollout":
        u, share = r.vllm.gpu_memory_utilization, min(1.0, cfg.resources.rollout.num_gpus)
        graphs = 0 if r.vllm.enforce_eager else CUDA_GRAPHS
        fits = math.floor((share * gpu_bytes - graphs) / gpu_bytes * 100) / 100  # the most that leaves room for graphs
        if 0 < fits < u:
            out.append((f"a lower --rollout.vllm.gpu_memory_utilization ({fits:g})",
                        "rollout.vllm.gpu_memory_utilization", fits))
        if u < 0.9:
            out.append(("a higher --rollout.vllm.gpu_memory_utilization (0.9)",
                        "rollout.vllm.gpu_memory_utilization", 0.9))
        if not r.vllm.enforce_eager:
            out.append(("--rollout.vllm.enforce_eager true", "rollout.vllm.enforce_eager", True))
        out.append((f"--rollout.tensor_parallel_size {2 * r.tensor_parallel_size}", "rollout.tensor_parallel_size",
                    2 * r.tensor_parallel_size))
        if r.max_model_len > longest:
            out.append((f"a smaller --rollout.max_model_len ({longest})", "rollout.max_model_len", longest))
    else:
        mbs = getattr(cfg, role).micro_batch_size
        if mbs > 1:
            out.append((f"a smaller --{role}.micro_batch_size ({mbs // 2})", f"{role}.micro_batch_size", mbs // 2))
    return out


@dataclass(frozen=True)
class MemoryPlan:
    """The estimates of a config's GPU roles and the GPU they must fit (``gpu_bytes`` None: unknown)."""

    cfg: Config
    estimates: list[RoleEstimate]
    gpu_bytes: int | None
    gpu_source: str
    read: Callable[[str], ModelShape] = ModelShape.read

    def budget(self, role: str) -> int | None:
        """Bytes of GPU memory one actor of ``role`` may use: its share of a GPU, at most one."""
        if self.gpu_bytes is None:
            return None
        return int(self.gpu_bytes * min(1.0, getattr(self.cfg.resources, role).num_gpus))

    def shortfall(self, est: RoleEstimate, cfg: Config | None = None) -> tuple[int, str, str]:
        """(bytes missing, the term that breaks it, why) for ``est`` under ``cfg`` (default: the
        plan's); 0 bytes missing when it fits or the GPU size is unknown. A rollout engine must also
        leave one ``max_model_len`` sequence of KV cache inside its gpu_memory_utilization."""
        cfg = cfg or self.cfg
        budget = self.budget(est.role)
        if budget is None:
            return 0, "", ""
        if est.role == "rollout":
            share = int(cfg.rollout.vllm.gpu_memory_utilization * self.gpu_bytes)
            if est.floor > share:
                return est.floor - share, "weights", (
                    f"its weights leave no KV cache for one {cfg.rollout.max_model_len}-token sequence within "
                    f"gpu_memory_utilization x GPU ({_gib(share)} GiB; that needs {_gib(est.floor)} GiB)")
        if est.total <= budget:
            return 0, "", ""
        term = max((k for k in est.terms if k != "CUDA context"), key=est.terms.__getitem__)
        return est.total - budget, term, f"needs about {_gib(est.total)} GiB per GPU but has {_gib(budget)} GiB"

    def _fixes(self, est: RoleEstimate, term: str) -> tuple[list[str], list[str]]:
        """(options that alone make the role fit, options that bring it closer), each with the new estimate."""
        missing = self.shortfall(est)[0]
        fit, closer = [], []
        for flag, key, value in _candidates(self.cfg, est.role, term, self.gpu_bytes):
            cfg = _set(self.cfg, key, value)
            try:
                resolve(cfg)
            except ConfigError:
                continue  # e.g. more ranks that the batch does not divide over
            trial = next(e for e in role_estimates(cfg, self.gpu_bytes, self.read) if e.role == est.role)
            left = self.shortfall(trial, cfg)[0]
            if left < missing:
                (closer if left else fit).append(f"{flag} (~{_gib(trial.total)} GiB)")
        return fit, closer

    def error(self) -> MemoryPlanError | None:
        """One error naming every role that cannot fit, or None."""
        paragraphs = []
        for est in self.estimates:
            missing, term, why = self.shortfall(est)
            if not missing:
                continue
            fit, closer = self._fixes(est, term)
            what = est.notes.get(term)
            text = (f"the {est.role} role ({est.count} actor(s)): {why}. The term that breaks it is {term}, "
                    f"{_gib(est.terms.get(term, 0))} GiB" + (f" ({what})" if what else "") + ".")
            if fit:
                text += " Each of these alone makes it fit: " + "; ".join(fit) + "."
            if closer:
                text += (" These bring it closer: " if fit else " No single option makes it fit; combine: ") + \
                    "; ".join(closer) + "."
            if not fit and not closer:
                text += " No option of this config shrinks it: give the role a larger GPU."
            paragraphs.append(text)
        if not paragraphs:
            return None
        return MemoryPlanError("memory plan: " + "\n".join(paragraphs)
                               + f"\n(GPU {_gib(self.gpu_bytes)} GiB: {self.gpu_source}. --dry-run prints every "
                                 "role's terms; --resources.gpu_memory_gib plans for another GPU.)")

    def lines(self) -> list[str]:
        """The plan as printed by --dry-run: per role its total and verdict, then its terms (GiB)."""
        if self.gpu_bytes is None:
            head = (f"memory plan per GPU, GiB (GPU size {self.gpu_source}: no verdict; set "
                    "--resources.gpu_memory_gib for one):")
        else:
            head = f"memory plan per GPU, GiB (GPU {_gib(self.gpu_bytes)} GiB: {self.gpu_source}):"
        out = [head]
        for est in self.estimates:
            budget = self.budget(est.role)
            verdict = "" if budget is None else ("  DOES NOT FIT in " if self.shortfall(est)[0] else "  fits in ")
            verdict += "" if budget is None else _gib(budget)
            if est.role == "rollout" and "KV cache and activations" not in est.terms:  # GPU size unknown
                verdict = f"  + KV cache and activations: {est.notes['KV cache and activations']}"
            out.append(f"  {est.role:<10} x{est.count}  {_gib(est.total):>6}{verdict}")
            for name, value in est.terms.items():
                note = est.notes.get(name, "")
                out.append(f"      {name:<26}{_gib(value):>6}  {note}".rstrip())
        return out

    def summary(self) -> str:
        """One line for a real launch's start-up."""
        roles = ", ".join(f"{e.role} {_gib(e.total)}" for e in self.estimates)
        if self.gpu_bytes is None:
            return f"memory plan (GiB per GPU): {roles}; GPU size {self.gpu_source}: no verdict"
        return f"memory plan (GiB per GPU): {roles}; fits a {_gib(self.gpu_bytes)} GiB GPU ({self.gpu_source})"


def memory_plan(cfg: Config, gpu: tuple[int | None, str] | None = None,
                read: Callable[[str], ModelShape] = ModelShape.read) -> MemoryPlan | None:
    """The plan of ``cfg`` (None for a CPU-only config). ``gpu``: (bytes, source) instead of
    :func:`gpu_size`; ``read``: a model's shape from its path (default: its config.json)."""
    res = cfg.resources
    if not any(getattr(res, r).num_gpus > 0 for r in ("rollout", "reference", "reward", "learner")):
        return None
    gpu_bytes, source = gpu if gpu is not None else gpu_size(cfg)
    return MemoryPlan(cfg, role_estimates(cfg, gpu_bytes, read), gpu_bytes, source, read)


def dry_run_report(cfg: Config) -> tuple[list[str], MemoryPlanError | None]:
    """What ``--dry-run`` prints after the placement plan, and the refusal if a role cannot fit.
    A model whose config.json cannot be read (e.g. a placeholder path) is reported, not raised."""
    try:
        plan = memory_plan(cfg)
    except (OSError, ValueError) as exc:
        return [f"memory plan: not estimated: {exc}"], None
    if plan is None:
        return [], None
    return plan.lines(), plan.error()


def check_memory(cfg: Config) -> MemoryPlan | None:
    """The pre-flight's check: raises :class:`MemoryPlanError` when a role cannot fit; prints one
    line. A model the plan cannot size (a config.json without Llama-style sizes) is reported and
    not refused: the plan is a guard, not a requirement."""
    try:
        plan = memory_plan(cfg)
    except (OSError, ValueError) as exc:
        print(f"memory plan: not estimated: {exc}", flush=True)
        return None
    if plan is None:
        return None
    error = plan.error()
    if error is not None:
        raise error
    print(plan.summary(), flush=True)
    return plan
