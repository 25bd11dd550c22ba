"""Results of remote calls that arrive later, with timeouts and errors that name the role.

The coordinator only ever sees ``Pending`` objects, so control-flow tests can hand it
in-process fakes that return ``Done`` values, without Ray.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

T = TypeVar("T")

Source = tuple[str, int]  # (role, rank/index): ("rollout", 0), ("learner", 1), ("reward", 0)


_SINGLE = ("reference", "reward")  # roles with one actor: named without an index


def describe(source: Source) -> str:
    """"rollout engine 0", "learner rank 1", "sft rank 0", "reward"."""
    role, index = source
    if role in _SINGLE:
        return role
    return f"rollout engine {index}" if role == "rollout" else f"{role} rank {index}"


class RemoteCallError(RuntimeError):
    """A remote role failed. ``kind`` is "died" (actor process gone), "timeout" (no answer in
    time) or "error" (the role raised); ``source`` names role and rank; ``what`` the call."""

    def __init__(self, message: str, kind: str, source: Source, what: str) -> None:
        super().__init__(message)
        self.kind, self.source, self.what = kind, source, what
        self.phase: str | None = None  # set by the coordinator

    def __str__(self) -> str:
        base = super().__str__()
        return f"[phase {self.phase}] {base}" if self.phase else base


class Pending(Protocol[T]):
    def result(self) -> T: ...


class Done(Generic[T]):
    """An already available result (in-process fakes, or work done locally)."""

    def __init__(self, value: T) -> None:
        self.value = value

    def result(self) -> T:
        return self.value


class RayPending(Generic[T]):
    """ObjectRefs from one or more actors; ``result`` waits at most ``timeout_s`` in total and
    combines the values. ``sources[i]`` is the (role, rank) that produced ``refs[i]``.

    Fails fast: the first actor death or remote exception raises at once, without waiting
    for the other calls (which may be blocked on the dead peer)."""

    def __init__(self, refs: Sequence[Any], sources: Sequence[Source], what: str, timeout_s: float,
                 combine: Callable[[list[Any]], T] = lambda xs: xs) -> None:  # type: ignore[assignment,return-value]
        self.refs, self.sources, self.what = list(refs), list(sources), what
        self.timeout_s, self.combine = timeout_s, combine

    def result(self) -> T:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        values: dict[int, Any] = {}
        index = {ref: i for i, ref in enumerate(self.refs)}
        waiting = list(self.refs)
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = ", ".join(describe(self.sources[index[r]]) for r in waiting)
                raise RemoteCallError(
                    f"{self.what}: no answer from {late} within {self.timeout_s:.0f} s (raise "
                    "--resources.call_timeout_s or --sync.timeout_s if the work is just slow).",
                    "timeout", self.sources[index[waiting[0]]], self.what)
            i = index[ready[0]]
            try:
                values[i] = ray.get(ready[0])
            except RayActorError as exc:
                raise RemoteCallError(f"{self.what}: {describe(self.sources[i])} died: {exc}", "died",
                                      self.sources[i], self.what) from exc
            except RayTaskError as exc:
                raise RemoteCallError(f"{self.what}: {describe(self.sources[i])} failed: {exc}", "error",
                                      self.sources[i], self.what) from exc
        return self.combine([values[i] for i in range(len(self.refs))])
