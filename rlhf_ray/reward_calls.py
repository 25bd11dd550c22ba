"""Scoring texts in calls: how the reward role cuts its samples into calls of a reward function
(``reward.kind function``) or requests to an endpoint (``reward.kind http``), and how many of
those run at once.

* Cutting (:func:`call_plan`): ``reward.samples_per_call`` consecutive samples per call; with 0
  (the default) the samples are cut into ``reward.concurrency`` calls of near-equal size, so at
  the defaults (concurrency 1) the function gets all of them in one call, as it always did. A
  function that scores one sample at a time (a judge behind an API) wants ``samples_per_call 1``.
* Running (:func:`score_in_calls`): at most ``reward.concurrency`` calls in flight. A plain
  function runs in that many threads (which helps while it waits on a network or a subprocess;
  Python code that computes holds the GIL and does not get faster); an ``async def`` function is
  awaited on one event loop, that many coroutines at a time. Concurrency 1 without a timeout
  calls the function in the caller's thread, as before.
* A call may take at most ``reward.function_timeout_s`` (0: no limit), counted from its start
  (not from when it was queued). An async call over it is cancelled; a plain function's thread
  cannot be stopped, so it is left to finish while the error goes up.

Scores come back in the samples' order whatever order the calls finish in. Requests to an
endpoint carry their own timeout and retries (``rlhf_ray.reward_server.post_scores``). The
prompt records' fields (one column per field, a value per sample) are cut with the samples: each
call gets its samples' values, as keyword arguments.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from rlhf_ray.batch import plan_passes
from rlhf_ray.rewards import is_async

POLL_S = 0.05  # how often running calls are checked against the timeout


def call_plan(n: int, samples_per_call: int, concurrency: int) -> list[list[int]]:
    """Sample indices of each call, consecutive runs over ``n`` samples (:func:`plan_passes` by rows):
    ``samples_per_call`` each, or with 0 the fewest runs of equal size (the last shorter) that make
    ``concurrency`` calls. E.g. n=5: (2, 1) -> [[0, 1], [2, 3], [4]]; (0, 2) -> [[0, 1, 2], [3, 4]];
    (0, 8) -> five calls of one sample. No samples, no call."""
    if samples_per_call < 0 or concurrency < 1:
        raise ValueError(f"samples_per_call must be >= 0 and concurrency >= 1, got {samples_per_call} and "
                         f"{concurrency}")
    if n == 0:
        return []
    size = samples_per_call or -(-n // concurrency)
    return [list(rows) for rows in plan_passes(n, max_rows=size) if rows is not None]


def with_named_errors(fn: Callable, what: str) -> Callable:
    """``fn`` (plain or async) whose exceptions come out as RuntimeError("<what> raised <type>: ...")
    with the original as the cause, so a user's error is told apart from a wrong count or a timeout."""
    def named(exc: Exception) -> RuntimeError:
        return RuntimeError(f"{what} raised {type(exc).__name__}: {exc}")

    if is_async(fn):
        async def call_async(prompts: list[str], responses: list[str], /, **fields):
            try:
                return await fn(prompts, responses, **fields)
            except Exception as exc:
                raise named(exc) from exc

        return call_async

    def call(prompts: list[str], responses: list[str], /, **fields):
        try:
            return fn(prompts, responses, **fields)
        except Exception as exc:
            raise named(exc) from exc

    return call


def slice_columns(columns: dict[str, list], rows: list[int]) -> dict[str, list]:
    """The values of ``rows`` in every column: {"answer": ["a", "b", "c"]}, [2, 0] -> {"answer": ["c", "a"]}."""
    return {name: [values[i] for i in rows] for name, values in columns.items()}


def score_in_calls(fn: Callable[..., Any], prompts: list[str], responses: list[str], *,
                   fields: dict[str, list] | None = None, samples_per_call: int = 0, concurrency: int = 1,
                   timeout_s: float = 0.0, what: str = "reward function") -> list[Any]:
    """``fn(prompts, responses, **fields)`` over the calls of :func:`call_plan`, at most
    ``concurrency`` at once, each call with its samples' values of every field column (one value
    per sample); returns the values of every call joined in the samples' order (one per sample,
    checked).

    An exception raised by a call goes up as it is (the first one seen); a call longer than
    ``timeout_s`` (> 0) raises TimeoutError naming ``what``, the call and the flag to change."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    fields = fields or {}
    for name, values in fields.items():
        if len(values) != len(responses):
            raise ValueError(f"field {name!r} has {len(values)} values for {len(responses)} responses")
    plan = call_plan(len(responses), samples_per_call, concurrency)
    calls = [([prompts[i] for i in rows], [responses[i] for i in rows], slice_columns(fields, rows)) for rows in plan]
    if not calls:
        return []
    if is_async(fn):
        results = _run_async(fn, calls, concurrency, timeout_s, what)
    elif (concurrency == 1 or len(calls) == 1) and timeout_s <= 0:
        results = [fn(p, r, **f) for p, r, f in calls]
    else:
        results = _run_threads(fn, calls, concurrency, timeout_s, what)
    out: list[Any] = []
    for rows, values in zip(plan, results):
        try:
            values = list(values)
        except TypeError:
            raise TypeError(f"{what} returned {type(values).__name__}, not a list of scores; it must return one "
                            "float per response.") from None
        if len(values) != len(rows):
            raise ValueError(f"{what} returned {len(values)} scores for {len(rows)} responses; it must return one "
                             "float per response.")
        out.extend(values)
    return out


def _timeout_error(what: str, k: int, calls: list, timeout_s: float) -> TimeoutError:
    return TimeoutError(f"{what}: call {k + 1} of {len(calls)} ({len(calls[k][1])} samples) ran longer than "
                        f"--reward.function_timeout_s {timeout_s:g} s; raise the limit (0: none), or send fewer "
                        "samples per call (--reward.samples_per_call) with more calls at once (--reward.concurrency).")


def _run_threads(fn, calls: list, concurrency: int, timeout_s: float, what: str) -> list:
    """Each call in a thread of a pool of ``concurrency``; the first error or timeout stops the wait
    (queued calls are cancelled, running ones left to finish)."""
    started: dict[int, float] = {}
    lock = threading.Lock()

    def one(k: int):
        with lock:
            started[k] = time.monotonic()
        p, r, f = calls[k]
        return fn(p, r, **f)

    pool = ThreadPoolExecutor(max_workers=min(concurrency, len(calls)), thread_name_prefix="reward-call")
    try:
        futures: dict[Future, int] = {pool.submit(one, k): k for k in range(len(calls))}
        results: list[Any] = [None] * len(calls)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=POLL_S if timeout_s > 0 else None, return_when=FIRST_COMPLETED)
            for fut in done:
                results[futures[fut]] = fut.result()  # raises the call's own exception
            if timeout_s > 0:
                now = time.monotonic()
                with lock:
                    late = [k for k in (futures[f] for f in pending) if k in started and now - started[k] > timeout_s]
                if late:
                    raise _timeout_error(what, min(late), calls, timeout_s)
        return results
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _run_async(fn, calls: list, concurrency: int, timeout_s: float, what: str) -> list:
    """The coroutines of every call on one event loop, ``concurrency`` at a time (a new loop in this
    thread, or in a helper thread when this one already runs a loop)."""

    async def gather() -> list:
        gate = asyncio.Semaphore(concurrency)

        async def one(k: int):
            p, r, f = calls[k]
            async with gate:
                if timeout_s <= 0:
                    return await fn(p, r, **f)
                try:
                    return await asyncio.wait_for(fn(p, r, **f), timeout_s)
                except asyncio.TimeoutError:
                    raise _timeout_error(what, k, calls, timeout_s) from None

        return list(await asyncio.gather(*(one(k) for k in range(len(calls)))))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())  # no loop in this thread: the usual case (a Ray actor's call)
    box: dict[str, Any] = {}

    def in_thread() -> None:
        try:
            box["value"] = asyncio.run(gather())
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=in_thread, name="reward-async")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
