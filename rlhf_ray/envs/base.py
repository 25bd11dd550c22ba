"""The environment contract: what a multi-turn episode talks to between the policy's turns.

With ``rollout.env`` set, a rollout is an episode instead of one response::

    reset(record)            the prompt record (every field of its line in the prompt file)
    policy turn  -> step(text) -> StepResult(observation, reward, done, info)
    observation appended as token ids (the policy's own tokens are kept as sampled)
    ... until done, rollout.max_turns, or rollout.max_episode_tokens

One object serves one episode (built fresh for each, so an environment may keep the episode's
state in ``self``). A tool is an environment that parses a call from the turn's text and returns
the tool's output as the observation. ``step`` runs in a worker thread of the coordinator, with
``rollout.env_timeout_s`` per call; a step that raises, overruns or returns something else than
a :class:`StepResult` ends its episode with a counted reason instead of stopping the run.

:func:`load_env_class` finds the class named by ``rollout.env`` (``path/to/file.py:Class`` or
``package.module:Class``); :func:`check_env` builds one before any role starts, so a class that
cannot be imported or constructed is one message at start-up. Standard library only.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class StepResult:
    """What the environment answers to one policy turn."""

    observation: str | list[int] = ""
    """Appended after the turn, as context the policy reads but is not trained on: text (tokenised
    once, without special tokens) or token ids. Empty: nothing is appended."""
    reward: float = 0.0
    """This turn's reward; it lands on the turn's last token (0 for most turns of most tasks)."""
    done: bool = False
    """The episode is over: the observation is not appended."""
    info: dict[str, Any] = field(default_factory=dict)
    """Counts for the metrics: ``tool_calls`` and ``tool_errors`` (ints) are summed over the batch."""


@runtime_checkable
class Environment(Protocol):
    """One episode's environment, built as ``cls(**rollout.env_args)``."""

    def reset(self, record: dict[str, Any]) -> None:
        """Start an episode on ``record``: the prompt record, with the prompt under ``prompt`` and
        every other field of the record (an expected answer, a test case, tool state)."""
        ...

    def step(self, text: str) -> StepResult:
        """The policy's turn (its sampled tokens, decoded without special tokens) -> what follows
        it. Called at most ``rollout.max_turns`` times per episode, never after ``done``."""
        ...


class EnvError(ValueError):
    """``rollout.env`` does not name a usable environment (raised before any role starts)."""


def load_env_class(spec: str) -> type:
    """The class ``spec`` names: ``path/to/file.py:Class`` (a file) or ``package.module:Class``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise EnvError(f"rollout.env {spec!r} is not of the form path/to/file.py:Class or package.module:Class.")
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise EnvError(f"rollout.env {spec!r}: no file {target!r} (paths are relative to the directory the "
                               "run starts in).")
            module_spec = importlib.util.spec_from_file_location(f"rlhf_env_{abs(hash(target))}", target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except EnvError:
        raise
    except Exception as exc:
        raise EnvError(f"rollout.env {spec!r}: importing {target!r} failed ({type(exc).__name__}: {exc}). Fix the "
                       "module, or point rollout.env at another one.") from exc
    cls = getattr(module, name, None)
    if cls is None or not inspect.isclass(cls):
        raise EnvError(f"rollout.env {spec!r}: {target!r} has no class {name!r}.")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise EnvError(f"rollout.env {spec!r}: {name} has no {' or '.join(missing)} method; an environment needs "
                       "reset(record) and step(text) -> StepResult (rlhf_ray/envs/base.py).")
    return cls


def check_env(spec: str, args: dict[str, Any]) -> type:
    """Load the class and build one instance with ``args`` (``rollout.env_args``), so that a class
    that cannot be constructed fails before any role starts. Returns the class."""
    cls = load_env_class(spec)
    try:
        cls(**args)
    except Exception as exc:
        raise EnvError(f"rollout.env {spec!r}: {cls.__name__}(**{args!r}) failed ({type(exc).__name__}: {exc}); "
                       "fix rollout.env_args or the class's constructor.") from exc
    return cls
