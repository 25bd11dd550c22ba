"""Results of remote calls that arrive later, with timeouts and errors that name the role.

The coordinator only ever sees ``Pending`` objects, so control-flow tests can hand it
in-process fakes that return ``Done`` values, without Ray.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

T = TypeVar("T")

Source = tuple[str, int]  # (role, rank/index): ("rollout", 0), ("learner", 1), ("reward", 0)


_REPLICATED = ("reference", "reward")  # one actor by default; replica 0 keeps the role's plain name


def describe(source: Source) -> str:
    """"rollout engine 0", "learner rank 1", "sft rank 0", "reward", "reward replica 1" (replica 0 of
    the reference and the reward is named as the role, what a run with one replica has always shown)."""
    role, index = source
    if role in _REPLICATED:
        return role if index == 0 else f"{role} replica {index}"
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


def attribute_failure(exc: RemoteCallError, probe: Callable[[], Pending[Any]]) -> RemoteCallError:
    """The member to blame for ``exc``, a failure of a call that several members make together
    (the weight sync: learner rank 0 sends, every engine receives).

    In such a call one member's failure first shows as another's: an engine that died or hangs
    makes learner rank 0's broadcast raise ("error" from learner rank 0) or time out, a learner
    that died makes an engine's receive raise. Ray reports the death itself later than that. So
    an "error" or "timeout" is not taken at its word: ``probe()`` pings every member (one
    ``Pending`` over their pings; give it time for the survivors to leave the failed collective),
    and a member that is dead or does not answer is the one that failed; its error is returned,
    saying what was seen first, with ``exc`` as its cause. If every member answers, ``exc``
    stands. A "died" is certain and is returned as it is, without a probe."""
    if exc.kind == "died":
        return exc
    try:
        probe().result()
    except RemoteCallError as found:
        if found.kind == "error":  # a ping that raises: nobody was found dead or silent
            return exc
        blamed = RemoteCallError(f"{exc.what}: {describe(found.source)} "
                                 f"{'died' if found.kind == 'died' else 'stopped answering'}, found by "
                                 f"pinging every member after the call failed ({found}); first seen as: {exc}",
                                 found.kind, found.source, exc.what)
        blamed.phase = exc.phase
        blamed.__cause__ = exc
        return blamed
    return exc


class Done(Generic[T]):
    """An already available result (in-process fakes, or work done locally)."""

    def __init__(self, value: T) -> None:
        self.value = value

    def result(self) -> T:
        return self.value


class RayPending(Generic[T]):
    """ObjectRefs from one or more actors; ``result`` combines their values. ``sources[i]`` is the
    (role, rank) that produced ``refs[i]``.

    Make it right after the ``.remote()`` calls: the timeout runs from then (``submitted``), not
    from ``result``. The score phase sends three calls at once and awaits them one after another;
    a deadline taken at each ``result`` would let the phase wait up to three times ``timeout_s``.

    Fails fast: the first actor death or remote exception raises at once, without waiting
    for the other calls (which may be blocked on the dead peer). Calls still unanswered then are
    left to finish or fail on their own and are never ``ray.cancel``-ed: in Ray 2.60 cancelling an
    actor call that the caller has not yet delivered to the actor leaves a hole in that actor's
    call sequence, and the actor then holds every later call from us for 30 s and fails them all
    (``ActorUnavailableError: Timed out waiting for seq_no N``). A cancel cannot stop a call that
    is already running either (cooperative only), so it bought nothing and broke healthy actors:
    after an engine died in a weight sync, the learner's next call failed that way. A timed-out
    actor is killed and replaced by the recovery path, which is what stops its work.

    ``api``: the ``ray`` module (the default), or an in-process fake of its ``wait``, ``get`` and
    ``exceptions`` for tests."""

    def __init__(self, refs: Sequence[Any], sources: Sequence[Source], what: str, timeout_s: float,
                 combine: Callable[[list[Any]], T] = lambda xs: xs,  # type: ignore[assignment,return-value]
                 api: Any = None) -> None:
        self.refs, self.sources, self.what = list(refs), list(sources), what
        self.timeout_s, self.combine = timeout_s, combine
        self.submitted = time.monotonic()
        self.api = api

    def result(self) -> T:
        api = self.api
        if api is None:
            import ray as api

        values: dict[int, Any] = {}
        index = {ref: i for i, ref in enumerate(self.refs)}
        waiting = list(self.refs)
        deadline = self.submitted + self.timeout_s
        while waiting:
            # fetch_local=False: a call that answered in time counts as answered even if its
            # value still has to come from another node (ray.get below fetches it).
            ready, waiting = api.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()),
                                      fetch_local=False)
            if not ready:
                late = ", ".join(describe(self.sources[index[r]]) for r in waiting)
                raise RemoteCallError(
                    f"{self.what}: no answer from {late} within {self.timeout_s:g} s of the call (raise "
                    "--resources.call_timeout_s or --sync.timeout_s if the work is just slow).",
                    "timeout", self.sources[index[waiting[0]]], self.what)
            i = index[ready[0]]
            try:
                values[i] = api.get(ready[0])
            except api.exceptions.RayActorError as exc:
                raise RemoteCallError(f"{self.what}: {describe(self.sources[i])} died: {exc}", "died",
                                      self.sources[i], self.what) from exc
            except api.exceptions.RayTaskError as exc:
                raise RemoteCallError(f"{self.what}: {describe(self.sources[i])} failed: {exc}", "error",
                                      self.sources[i], self.what) from exc
        return self.combine([values[i] for i in range(len(self.refs))])

