"""A calculator tool as an environment: the tool-use main job's (``configs/tools_cpu.yaml``).

The policy calls the tool by writing ``<calc>EXPRESSION</calc>`` in its turn; the run stops the
turn at the closing tag (``rollout.stop: ["</calc>"]``). The environment evaluates the LAST call
of the turn and answers with its value as the observation, e.g. a turn `` <calc> 37 * 48</calc>``
gets `` 1776.``. A turn without a complete call ends the episode (the policy has answered). An
expression the calculator cannot read gets the observation `` error.`` and counts a tool error;
the episode goes on, so the policy may try again within ``rollout.max_turns``.

The calculator reads integers, ``+ - *``, unary minus and parentheses, with the usual precedence
(``*`` before ``+ -``, left to right), by a recursive-descent parser: no ``eval``, nothing else of
Python reachable. Expressions are limited in length and in digits per number, so a call is cheap.

    env = CalculatorEnv()
    env.reset({"prompt": "Q: what is 37 * 48? A:", "answer": 1776})
    env.step(" <calc> 37 * 48</calc>")   # StepResult(observation=" 1776.", reward=0.0, done=False, ...)
    env.step(" answer 1776")             # StepResult(observation="", reward=0.0, done=True, ...)

What it leaves out: division (the task needs none), several tools, rewards (the answer is scored
by ``rlhf_ray.rewards:tool_answer_correct`` on the whole episode). Standard library only.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf_ray.envs.base import StepResult

OPEN, CLOSE = "<calc>", "</calc>"
ERROR_OBSERVATION = " error."
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_TOKEN = re.compile(r"\s*(?:(\d+)|(\S))")


class CalcError(ValueError):
    """The expression is not one the calculator reads (the message says where)."""


def find_calls(text: str) -> list[str]:
    """The expressions of every complete ``<calc>...</calc>`` in ``text``, in order. A call is
    complete once its closing tag is written; an opening tag without one is no call."""
    return [m.group(1) for m in _CALL.finditer(text)]


def _tokens(expression: str, max_digits: int) -> list[str | int]:
    out: list[str | int] = []
    for m in _TOKEN.finditer(expression):
        number, other = m.group(1), m.group(2)
        if number is not None:
            if len(number) > max_digits:
                raise CalcError(f"a number of {len(number)} digits (at most {max_digits})")
            out.append(int(number))
        elif other is not None:
            if other not in "+-*()":
                raise CalcError(f"unexpected character {other!r}")
            out.append(other)
    return out


class _Parser:
    """expr := term (('+' | '-') term)* ; term := unary ('*' unary)* ;
    unary := '-' unary | INT | '(' expr ')'"""

    def __init__(self, tokens: list[str | int]) -> None:
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str | int | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | int | None:
        token = self.peek()
        self.pos += 1
        return token

    def expr(self) -> int:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> int:
        value = self.unary()
        while self.peek() == "*":
            self.take()
            value *= self.unary()
        return value

    def unary(self) -> int:
        token = self.take()
        if token == "-":
            return -self.unary()
        if token == "(":
            value = self.expr()
            if self.take() != ")":
                raise CalcError("a '(' without its ')'")
            return value
        if isinstance(token, int):
            return token
        raise CalcError("the expression ends early" if token is None else f"{token!r} where a number belongs")


def evaluate(expression: str, max_chars: int = 64, max_digits: int = 12) -> int:
    """The value of ``expression`` (integers, ``+ - *``, unary minus, parentheses); a
    :class:`CalcError` for anything else, an empty expression, or more than ``max_chars``
    characters."""
    if len(expression) > max_chars:
        raise CalcError(f"{len(expression)} characters (at most {max_chars})")
    parser = _Parser(_tokens(expression, max_digits))
    value = parser.expr()
    if parser.peek() is not None:
        raise CalcError(f"{parser.peek()!r} after a complete expression")
    return value


class CalculatorEnv:
    """One episode with the calculator tool (see the module docstring); ``rollout.env_args`` may
    set ``max_chars`` and ``max_digits`` of an expression."""

    def __init__(self, max_chars: int = 64, max_digits: int = 12) -> None:
        if max_chars < 1 or max_digits < 1:
            raise ValueError(f"max_chars and max_digits must be >= 1, got {max_chars} and {max_digits}")
        self.max_chars, self.max_digits = max_chars, max_digits
        self.record: dict[str, Any] = {}

    def reset(self, record: dict[str, Any]) -> None:
        self.record = record  # the calculator needs nothing from it; kept for subclasses and debugging

    def step(self, text: str) -> StepResult:
        calls = find_calls(text)
        if not calls:
            return StepResult(done=True, info={"tool_calls": 0, "tool_errors": 0})
        try:
            value = evaluate(calls[-1], self.max_chars, self.max_digits)
        except CalcError:
            return StepResult(observation=ERROR_OBSERVATION, info={"tool_calls": 1, "tool_errors": 1})
        return StepResult(observation=f" {value}.", info={"tool_calls": 1, "tool_errors": 0})
