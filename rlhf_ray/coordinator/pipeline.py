"""The asynchronous pipeline (``rollout.max_staleness`` k >= 1): batches generated and scored
ahead of training, every stage busy with a different batch.

::

    generation thread              scoring thread                  coordinator (the learner stage)
    ----------------------------   -----------------------------   --------------------------------
    wait until a batch may start   take the next generated batch;  sync the engines if stale; take
    (the staleness bound); draw    reference logprobs and reward,  the next scored batch; old
    its prompts; generate it on    both in flight at once; hand    logprobs and values, advantages,
    the engines; hand it on        it on, in order                 update; the policy version + 1

Versions: the policy version P counts the updates that changed the policy; the engines hold the
version E of their last sync. A batch that starts now is trained after the batches ahead of it
(queued, or in the learner now), each adding at most one version, so it starts only while
``P + ahead - E <= k``: no token is trained more than k versions after the weights that sampled
it. Every sample carries the version of each of its tokens (``Generation.versions``), from the
engine lock: a generate call is submitted under it, with the version the engines hold, and a
sync holds it until the engines have loaded (an engine runs its calls in the order they come).

Partial rollouts (``rollout.partial_rollout_tokens`` n): a batch is generated n tokens at a time
(:func:`generate_in_segments`), so a sync that comes while the batch generates is loaded between
two segments: the responses in flight go on with the new weights, their later tokens tagged with
the new version, and the sync waits for one segment instead of the whole batch.

Every learner call stays on the coordinator's thread (a reference computed by the learners too):
calls to the ranks of a collective group must reach every rank in one order. What the pipeline
holds is not state: the prompts it drew and nobody trained yet are (``pending``); after a
failure or a resume it starts again by generating those, in order, on the current weights, so
nothing is lost and nothing is trained twice.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rlhf_ray.backends.rollout import SamplingSpec
from rlhf_ray.batch import Generation
from rlhf_ray.coordinator.episodes import EngineCall
from rlhf_ray.runtime.pending import Pending


class _Stopped(Exception):
    """The pipeline was stopped (or restarted) while this thread worked: its result is dropped."""


class _Failed(Exception):
    """A stage failed on batch ``index``; ``exc`` is what it raised."""

    def __init__(self, exc: BaseException, index: int) -> None:
        super().__init__(str(exc))
        self.exc, self.index = exc, index


@dataclass
class Slot:
    """One batch on its way through the pipeline."""

    index: int  # its place in training order since the pipeline started
    prompts: list[int]
    iteration: int  # the iteration that trains it
    gen: Generation | None = None
    scored: Any = None  # what the scoring stage returned
    times: dict[str, float] = field(default_factory=dict)  # time/generate, time/score
    events: list[list] = field(default_factory=list)  # [lane, label, start, end] in seconds since the run began


class _Tagged:
    """A generate call's result with each response token tagged with the engines' version."""

    def __init__(self, pending: Pending[Generation], version: int) -> None:
        self.pending, self.version = pending, version

    def result(self) -> Generation:
        gen = self.pending.result()
        gen.versions = [[self.version] * len(r) for r in gen.response_ids]
        return gen


class EngineVersion:
    """The policy version the engines hold, and the lock that keeps it exact: generate calls are
    submitted and syncs run under it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version = 0

    def tagged(self, call: EngineCall) -> EngineCall:
        """``call`` whose results carry ``versions`` (the version at submission, one per token)."""
        def submit(prompt_ids: list[list[int]], spec: SamplingSpec) -> Pending[Generation]:
            with self.lock:
                return _Tagged(call(prompt_ids, spec), self.version)
        return submit

    def sync(self, send: Callable[[], dict], version: int) -> dict:
        """Run ``send`` (the weight sync) with no generate call submitted meanwhile; the engines
        then hold ``version``."""
        with self.lock:
            out = send()
            self.version = version
            return out


def generate_in_segments(call: EngineCall, prompt_ids: list[list[int]], spec: SamplingSpec,
                         segment: int) -> Generation:
    """``spec.n`` responses per prompt, as one generate call would give them, sampled ``segment``
    tokens at a time: after the first call (n per prompt), each response not yet finished goes on
    from its prompt and its tokens so far (n = 1), until it stops or has ``spec.max_new_tokens``
    tokens. The same distribution (sampling is autoregressive), at the price of one prefill per
    segment; between two segments a weight sync may land. The lists ``call`` returns per token
    (logprobs, versions) are joined in order."""
    first = call(prompt_ids, dataclasses.replace(spec, max_new_tokens=min(segment, spec.max_new_tokens))).result()
    out = Generation(list(first.prompt_ids), [list(r) for r in first.response_ids], [list(lp) for lp in first.logprobs],
                     list(first.finish_reasons), list(first.prompt_index),
                     versions=None if first.versions is None else [list(v) for v in first.versions])

    def unfinished(rows):
        return [j for j in rows if out.finish_reasons[j] == "length" and len(out.response_ids[j]) < spec.max_new_tokens]

    rows = unfinished(range(len(out)))
    while rows:
        room = spec.max_new_tokens - len(out.response_ids[rows[0]])  # every unfinished response is as long
        more = call([out.prompt_ids[j] + out.response_ids[j] for j in rows],
                    dataclasses.replace(spec, n=1, max_new_tokens=min(segment, room))).result()
        for k, j in enumerate(rows):
            out.response_ids[j] += more.response_ids[k]
            out.logprobs[j] += more.logprobs[k]
            out.finish_reasons[j] = more.finish_reasons[k]
            if out.versions is not None:
                out.versions[j] += more.versions[k]
        rows = unfinished(rows)
    return out


class BatchPipeline:
    """The generation and scoring stages of the pipeline, each on a thread of its own; the
    coordinator is the learner stage (:meth:`take`, :meth:`trained`).

    ``draw()`` gives the prompts of a new batch (called under ``lock``, which the coordinator
    also holds when it reads or changes its prompt sampler); ``generate(prompts, iteration)``
    generates a batch (through ``engines.tagged`` calls); ``score(slot)`` scores a generated one
    (``slot.gen``, ``slot.prompts``). ``clock`` gives seconds; events are timed from ``t0``."""

    def __init__(self, staleness: int, engines: EngineVersion, draw: Callable[[], list[int]],
                 generate: Callable[[list[int], int], Generation], score: Callable[[Slot], Any],
                 lock: threading.RLock, t0: float, clock: Callable[[], float] = time.perf_counter) -> None:
        if staleness < 1:
            raise ValueError(f"the pipeline needs max_staleness >= 1 (got {staleness}); 0 is the on-policy loop")
        self.staleness, self.engines = staleness, engines
        self._draw, self._generate, self._score = draw, generate, score
        self.lock, self.t0, self.clock = lock, t0, clock
        self._cond = threading.Condition(lock)
        self._epoch = 0
        self._running = False
        self.policy_version = 0
        self.pending: list[list[int]] = []  # prompts of the batches drawn and not yet trained, in order
        self._replay: list[list[int]] = []
        self._started = self._taken = 0
        self._busy = False  # the learner holds a batch
        self._paused = False
        self._generating = 0  # the epoch whose generation thread is inside a generate call (0: none)
        self._first_iteration = 0
        self._generated: list[Slot] = []
        self._ready: dict[int, Slot] = {}
        self._error: BaseException | None = None
        self._error_at = 0  # the batch whose stage failed: those before it can still be trained
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._running

    def start(self, iteration: int, policy_version: int, pending: list[list[int]]) -> None:
        """Start the stages for the batch trained at ``iteration`` onwards: first the ``pending``
        prompts (drawn before, never trained), in order, then new draws."""
        with self._cond:
            self._epoch += 1
            epoch = self._epoch
            self._running, self._error, self._paused, self._busy, self._generating = True, None, False, False, 0
            self.policy_version, self._first_iteration = policy_version, iteration
            self.pending, self._replay = [list(p) for p in pending], [list(p) for p in pending]
            self._started = self._taken = 0
            self._generated, self._ready = [], {}
        self._threads = [threading.Thread(target=self._guarded, args=(target, epoch), daemon=True, name=name)
                         for target, name in ((self._generation_loop, "pipeline-generate"),
                                              (self._scoring_loop, "pipeline-score"))]
        for t in self._threads:
            t.start()

    def stop(self, wait_s: float = 10.0) -> None:
        """Drop every batch in flight; the threads end when their current call returns (a result
        that comes later is thrown away), waited for up to ``wait_s`` seconds (a call to a hung
        role returns only at its timeout: that thread is left to end on its own). ``pending``
        keeps the prompts to generate again."""
        with self._cond:
            self._epoch += 1
            self._running = False
            self._cond.notify_all()
        threads, self._threads = self._threads, []
        deadline = time.monotonic() + wait_s
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ the learner stage
    def take(self) -> tuple[Slot, dict[str, float]]:
        """The next batch in training order, scored; waits for it. Raises what a stage raised if that
        came before the batch was ready (a batch that is ready is trained first)."""
        t0 = self.clock()
        with self._cond:
            ready_now = len(self._ready)
            while self._taken not in self._ready and (self._error is None or self._error_at > self._taken):
                self._cond.wait()
            if self._taken not in self._ready:  # a stage failed before this batch was ready
                raise self._error
            slot = self._ready.pop(self._taken)
            self._taken += 1
            self._busy = True
            self._cond.notify_all()
        return slot, {"time/wait_batch": self.clock() - t0, "pipeline/batches_ready": float(ready_now)}

    def trained(self, policy_changed: bool) -> None:
        """The batch taken last is trained (its prompts leave ``pending``); ``policy_changed``: the
        update changed the policy (a critic warm-up or a skipped update does not)."""
        with self._cond:
            self.pending.pop(0)
            self.policy_version += int(policy_changed)
            self._busy = False
            self._cond.notify_all()

    def pause(self) -> None:
        """Start no new batch, and wait until the generation thread is between batches (the
        engines then finish the calls they have, and are free for an evaluation)."""
        with self._cond:
            self._paused = True
            while self._generating and self._error is None and self._running:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # ------------------------------------------------------------------ the stages
    def _may_start(self) -> bool:
        ahead = (self._started - self._taken) + int(self._busy)
        return not self._paused and self.policy_version + ahead - self.engines.version <= self.staleness

    def _guarded(self, target: Callable[[int], None], epoch: int) -> None:
        try:
            target(epoch)
        except _Stopped:
            pass
        except _Failed as failed:  # raised by take() on the coordinator's thread
            self._fail(epoch, failed.exc, failed.index)
        except BaseException as exc:  # noqa: BLE001 - a fault of the pipeline itself: fail at once
            self._fail(epoch, exc, 0)

    def _fail(self, epoch: int, exc: BaseException, index: int) -> None:
        with self._cond:
            if epoch == self._epoch and self._error is None:
                self._error, self._error_at = exc, index
            self._cond.notify_all()

    def _check(self, epoch: int) -> None:
        if epoch != self._epoch or not self._running:
            raise _Stopped

    def _generation_loop(self, epoch: int) -> None:
        while True:
            with self._cond:
                while True:
                    self._check(epoch)
                    if self._may_start():
                        break
                    self._cond.wait()
                if self._replay:
                    prompts = self._replay.pop(0)
                else:
                    prompts = list(self._draw())
                    self.pending.append(prompts)
                slot = Slot(self._started, prompts, self._first_iteration + self._started)
                self._started += 1
                self._generating = epoch
            start = self.clock()
            try:
                slot.gen = self._generate(slot.prompts, slot.iteration)
            except Exception as exc:  # noqa: BLE001 - the batches before this one can still be trained
                raise _Failed(exc, slot.index) from exc
            finally:
                with self._cond:
                    if self._generating == epoch:
                        self._generating = 0
                    self._cond.notify_all()
            end = self.clock()
            slot.times["time/generate"] = end - start
            slot.events.append(["engines", f"generate {slot.iteration}", start - self.t0, end - self.t0])
            with self._cond:
                self._check(epoch)
                self._generated.append(slot)
                self._cond.notify_all()

    def _scoring_loop(self, epoch: int) -> None:
        while True:
            with self._cond:
                while True:
                    self._check(epoch)
                    if self._generated:
                        break
                    self._cond.wait()
                slot = self._generated.pop(0)
            start = self.clock()
            try:
                slot.scored = self._score(slot)
            except Exception as exc:  # noqa: BLE001
                raise _Failed(exc, slot.index) from exc
            end = self.clock()
            slot.times["time/score"] = end - start
            slot.events.append(["reference+reward", f"score {slot.iteration}", start - self.t0, end - self.t0])
            with self._cond:
                self._check(epoch)
                self._ready[slot.index] = slot
                self._cond.notify_all()


def staleness_metrics(versions: list[list[int]], actions: list[list[bool]] | None, trained_at: int,
                      bound: int) -> dict[str, float]:
    """How far behind the trained policy (version ``trained_at``) the batch's sampled tokens are:
    mean and max over tokens, the share of tokens per lag 0..bound, and the share of samples
    whose tokens span two versions or more (partial rollouts). Only the policy's tokens count
    (``actions``: per token, None = all). Raises if a token lags more than ``bound``: the
    pipeline's invariant is broken."""
    lags, spanning = [], 0
    for j, vs in enumerate(versions):
        mine = list(vs) if actions is None else [v for v, a in zip(vs, actions[j]) if a]
        lags += [trained_at - v for v in mine]
        spanning += int(len(set(mine)) > 1)
    if not lags:
        return {}
    worst = max(lags)
    if worst > bound or min(lags) < 0:
        raise RuntimeError(f"a trained token lags {worst} policy versions (min {min(lags)}), outside "
                           f"[0, rollout.max_staleness {bound}]: the pipeline's version bookkeeping is broken.")
    out = {"staleness/mean": sum(lags) / len(lags), "staleness/max": float(worst),
           "staleness/spanning_samples": spanning / len(versions)}
    for lag in range(bound + 1):
        out[f"staleness/share_{lag}"] = sum(1 for x in lags if x == lag) / len(lags)
    return out
