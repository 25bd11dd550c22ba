"""Results of remote calls that arrive later, with timeouts and errors that name the role.

The coordinator only ever sees ``Pending`` objects, so control-flow tests can hand it
in-process fakes that return ``Done`` values, without Ray.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

T = TypeVar("T")


class RemoteCallError(RuntimeError):
    """A remote role failed or timed out; the message names role, rank and phase."""


class Pending(Protocol[T]):
    def result(self) -> T: ...


class Done(Generic[T]):
    """An already available result (in-process fakes, or work done locally)."""

    def __init__(self, value: T) -> None:
        self.value = value

    def result(self) -> T:
        return self.value


class RayPending(Generic[T]):
    """ObjectRefs from one or more actors; ``result`` waits at most ``timeout_s`` and combines.

    ``labels[i]`` names the role and rank that produced ``refs[i]`` (e.g. "learner rank 1")."""

    def __init__(self, refs: Sequence[Any], labels: Sequence[str], what: str, timeout_s: float,
                 combine: Callable[[list[Any]], T] = lambda xs: xs) -> None:  # type: ignore[assignment,return-value]
        self.refs, self.labels, self.what = list(refs), list(labels), what
        self.timeout_s, self.combine = timeout_s, combine

    def result(self) -> T:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        ready, not_ready = ray.wait(self.refs, num_returns=len(self.refs), timeout=self.timeout_s)
        if not_ready:
            late = [self.labels[self.refs.index(r)] for r in not_ready]
            raise RemoteCallError(
                f"{self.what}: no answer from {', '.join(late)} within {self.timeout_s:.0f} s "
                "(raise --resources.call_timeout_s or --sync.timeout_s if the work is just slow).")
        values = []
        for ref, label in zip(self.refs, self.labels):
            try:
                values.append(ray.get(ref))
            except (RayActorError, RayTaskError, GetTimeoutError) as exc:
                raise RemoteCallError(f"{self.what}: {label} failed: {exc}") from exc
        return self.combine(values)
