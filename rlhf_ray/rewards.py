"""Reward functions: the built-in demo tasks, the loader for user functions, and which fields of
the prompt records a function takes.

A reward function has the signature ``fn(prompts: list[str], responses: list[str], **fields) ->
list[float]`` and returns one score per response; it may be an ``async def`` (awaited, several
calls at once with ``reward.concurrency``: ``rlhf_ray/reward_calls.py``). Users point
``reward.function`` at ``path/to/file.py:function_name`` or ``package.module:function_name``.

Fields: a prompt record's fields other than the prompt (``{"prompt": "What is 3*4?", "answer":
"12"}``) reach the function as keyword arguments, each a list with one value per response (the
value of that response's prompt; None where its record lacks the field). A function gets the
fields it names as parameters (``fn(prompts, responses, answer)``), all of them with ``**kwargs``,
and none when it takes only the two lists, as before fields existed (:class:`FieldParameters`).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

RewardFn = Callable[[list[str], list[str]], list[float]]


def digit_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Demo task "answer in digits": the fraction of a response's non-space characters that are
    digits (0 for an empty response). A random tiny model scores ~0.1; the best answer is all
    digits (1.0)."""
    scores = []
    for text in responses:
        chars = [c for c in text if not c.isspace()]
        scores.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return scores


def word_count_target(prompts: list[str], responses: list[str], target: int = 4) -> list[float]:
    """Demo task "answer in four words": -|words - target| / target."""
    return [-abs(len(r.split()) - target) / target for r in responses]


LARGER_PROMPT = "Q: which is larger, {a} or {b}? A:"
"""The demo task "which is larger" (``rlhf_ray.data.compare_task``): two different numbers, one answer."""
_LARGER = re.compile(r"which is larger, (\d+) or (\d+)\? A:$")


def larger_number_correct(prompts: list[str], responses: list[str]) -> list[float]:
    """Gold check of the demo task "which is larger": 1.0 when the response is exactly the larger
    of the prompt's two numbers (spaces and one final "." allowed: " 52", "52."), else 0.0, so
    " 52 52" and " 52 or 17" are wrong. The reward model is never shown this function: it learns
    from preference pairs and only approximates it. A prompt of another form is a ValueError."""
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        m = _LARGER.search(prompt.strip())
        if m is None:
            raise ValueError(f"not a 'which is larger' prompt: {prompt!r} (expected {LARGER_PROMPT!r})")
        answer = response.strip().removesuffix(".").strip()
        out.append(1.0 if answer == str(max(int(m[1]), int(m[2]))) else 0.0)
    return out


def is_async(fn: Callable) -> bool:
    """Whether calling ``fn`` gives a coroutine (an ``async def`` function, or an object whose
    ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


@dataclass(frozen=True)
class FieldParameters:
    """Which record fields a reward function takes, read from its signature
    (:func:`field_parameters`). ``prompts`` and ``responses`` go to its first two positional
    parameters (``bound``); a field goes to a later parameter of its name (``named``, those without
    a default ``required``), or to ``**kwargs`` (``takes_all``)."""

    bound: tuple[str, ...] = ()
    named: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    takes_all: bool = False

    def pick(self, fields: dict[str, list] | None) -> dict[str, list]:
        """The columns of ``fields`` the function takes."""
        fields = fields or {}
        return {k: v for k, v in fields.items() if (self.takes_all and k not in self.bound) or k in self.named}

    def check(self, names: Iterable[str], what: str, source: str = "--data.prompts") -> None:
        """A clear error when the records' field ``names`` cannot fill the function's parameters:
        a parameter without a default that no record has, or (with ``**kwargs``) a field named like
        the parameter its prompts or responses go to."""
        names = list(names)
        have = ", ".join(repr(n) for n in names) or "none"
        for name in self.required:
            if name not in names:
                raise ValueError(f"{what} has a parameter {name!r} without a default, and no record of {source} has "
                                 f"a field {name!r} to fill it (their fields besides the prompt: {have}). Add "
                                 f'"{name}" to the records, give the parameter a default, or rename it to one of '
                                 "their fields.")
        clash = [n for n in names if self.takes_all and n in self.bound]
        if clash:
            raise ValueError(f"{what} takes **kwargs and the records of {source} have a field {clash[0]!r}, the name "
                             "of the parameter its prompts or responses go to; rename the field or the parameter.")


def field_parameters(fn: Callable) -> FieldParameters:
    """The record fields ``fn`` takes (see :class:`FieldParameters`); a callable without a readable
    signature (some built-ins) takes none."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return FieldParameters()
    kind = inspect.Parameter
    bound = [p for p in params if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)][:2]
    named = [p for p in params if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY) and p not in bound]
    return FieldParameters(tuple(p.name for p in bound), tuple(p.name for p in named),
                           tuple(p.name for p in named if p.default is p.empty),
                           any(p.kind == kind.VAR_KEYWORD for p in params))


def call_once(fn: Callable, prompts: list[str], responses: list[str], fields: dict[str, list] | None = None) -> Any:
    """``fn(prompts, responses, **fields)``, awaited on a new event loop when it returns an
    awaitable (an ``async def`` reward function), from a thread that runs no loop (a probe, a
    server's handler). ``fields``: the columns ``fn`` takes (:meth:`FieldParameters.pick`)."""
    out = fn(prompts, responses, **(fields or {}))
    if inspect.isawaitable(out):
        async def wait():
            return await out

        out = asyncio.run(wait())
    return out


def load_reward_function(spec: str) -> RewardFn:
    """Resolve ``path/to/file.py:name`` or ``package.module:name`` to a callable, with an error
    that says what is wrong and how to fix it."""
    if ":" not in spec:
        raise ValueError(f"reward function {spec!r} must look like path/to/file.py:name or module:name.")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise FileNotFoundError(f"reward function file {where!r} does not exist (from --reward.function "
                                    f"{spec!r}); give a path relative to the working directory or absolute.")
        mod_spec = importlib.util.spec_from_file_location(f"rlhf_user_reward_{abs(hash(where))}", where)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ImportError(f"cannot import module {where!r} for --reward.function {spec!r}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AttributeError(f"{where!r} has no function {name!r} (from --reward.function {spec!r}).")
    return fn


def tool_answer_correct(prompts: list[str], responses: list[str], answer: list | None = None) -> list[float]:
    """Reward and gold check of the tool-use demo task "multiply with a calculator"
    (``rlhf_ray.data.tool_task``): 1.0 when the last ``answer N`` of the episode's text (turns and
    calculator outputs after the prompt) is the expected answer, else 0.0 (also with no answer).
    ``answer`` holds the records' ``answer`` fields, one per response (ints or digit strings);
    without it (a caller that passes no record fields) the product is read from the prompt
    (``Q: what is 37 * 48? A:``), and a prompt of another form is a ValueError."""
    from rlhf_ray.data.tool_task import final_answer, operands_of

    if answer is None:
        expected = [a * b for a, b in (operands_of(p) for p in prompts)]
    else:
        bad = [x for x in answer if not re.fullmatch(r"\s*-?\d+\s*", str(x))]
        if bad:
            raise ValueError(f"tool_answer_correct: a record's answer field is {bad[0]!r}, not an integer; fix the "
                             "prompt file's answer fields.")
        expected = [int(str(x)) for x in answer]
    if len(expected) != len(responses):
        raise ValueError(f"tool_answer_correct got {len(expected)} expected answers for {len(responses)} responses")
    return [1.0 if final_answer(r) == e else 0.0 for r, e in zip(responses, expected)]
