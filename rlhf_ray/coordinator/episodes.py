"""Multi-turn episodes: the policy's turns on the rollout engines, the environment's calls on the
episodes' own threads, all of one iteration's episodes at once.

::

    engine thread i (one per engine)            episode threads (one per episode)
    -------------------------------------       ----------------------------------------------
    take a share of the due episodes       ->   reset(record) first; then, for each sampled
    one generate call on engine i (n = 1)       turn, env.step(text); at most rollout.env_workers
    hand each turn to its episode's thread <-   calls at once, each within rollout.env_timeout_s;
                                                append the observation's ids and queue the next
                                                turn, or end the episode

An engine never waits for a tool: while some episodes' tools run, it generates the turns of the
others (whichever are due when it is free; idle engines split what is due), so an iteration's time
is not the sum of its tool latencies (``benchmarks/episodes.py`` measures it).

Token in, token out: an episode's context is its prompt ids followed by every sampled token as the
engine returned it and every observation's ids; nothing is decoded and encoded again. The text an
environment sees is decoded from the turn's ids (for the environment only); an observation's text
is encoded once. What comes back is one :class:`~rlhf_ray.batch.Generation` sample per episode,
with the episode lists set (which tokens are actions, the turn rewards, the counts).

A broken environment ends only its own episode, with a counted finish reason: ``env_error`` (it
raised, or answered something other than a ``StepResult``; a reset that fails or overruns: after
the first turn) or ``env_timeout`` (a step overran; its thread cannot be stopped and is left to
finish, no longer counted against the workers). An engine that fails stops the whole call (the
coordinator then redoes the iteration).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from rlhf_ray.backends.rollout import SamplingSpec
from rlhf_ray.batch import Generation
from rlhf_ray.config import Config
from rlhf_ray.config.episodes import episode_tokens
from rlhf_ray.data.prompts import PromptSet
from rlhf_ray.envs.base import Environment, StepResult, load_env_class
from rlhf_ray.runtime.pending import Pending

EngineCall = Callable[[list[list[int]], SamplingSpec], Pending[Generation]]


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int  # policy turns at most
    max_episode_tokens: int  # tokens after the prompt (turns and observations) at most
    timeout_s: float  # one environment step at most
    workers: int  # environment steps at once


@dataclass
class Episode:
    """One episode's state; ``tokens`` holds everything after the prompt, in order."""

    prompt_index: int
    prompt_ids: list[int]
    env: Any
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    actions: list[bool] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    versions: list[int] | None = field(default_factory=list)  # per token (None once a turn came untagged)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    env_seconds: float = 0.0
    finish: str | None = None
    broken: str | None = None  # why reset failed: the first turn runs, then the episode ends (env_error)
    last_turn: tuple[list[int], str] = ([], "")  # the last turn's tokens and engine finish reason

    def context(self) -> list[int]:
        return self.prompt_ids + self.tokens

    def info(self) -> dict:
        return {"turns": self.turns, "tool_calls": self.tool_calls, "tool_errors": self.tool_errors,
                "observation_tokens": len(self.actions) - sum(self.actions), "env_seconds": self.env_seconds,
                **({"error": self.broken} if self.broken else {})}


class EpisodeRunner:
    """Runs the episodes of one generate call over ``engines`` (one callable per rollout engine,
    each sending one generate call to its engine; :meth:`run`).

    ``make_env`` builds one environment (``rollout.env`` with ``rollout.env_args``); ``encode``
    turns an observation's text into ids (no special tokens), ``decode`` a turn's ids into the text
    the environment reads. Each episode's environment lives on a thread of its own (its ``reset``
    and every ``step`` run there, so thread-bound state such as a database connection works); at
    most ``limits.workers`` of those calls run at once, and one that overruns ``limits.timeout_s``
    is abandoned: its episode ends, its thread is left to finish and no longer counts."""

    def __init__(self, make_env: Callable[[], Environment], encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], limits: EpisodeLimits) -> None:
        self.make_env, self.encode, self.decode, self.limits = make_env, encode, decode, limits

    def run(self, engines: Sequence[EngineCall], prompt_ids: list[list[int]], records: list[dict],
            spec: SamplingSpec) -> Generation:
        """``spec.n`` episodes per prompt (``records[i]`` is prompt i's record, given to ``reset``),
        grouped by prompt in prompt order like a single-turn generate: ``prompt_index`` is the
        prompt's position in ``prompt_ids``. Each turn samples with ``spec`` (n = 1, at most
        ``spec.max_new_tokens`` tokens, its stop strings). Raises the first engine failure."""
        if len(records) != len(prompt_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(records)} records")
        episodes = [Episode(i, list(ids), None) for i, ids in enumerate(prompt_ids) for _ in range(spec.n)]
        turn_spec = replace(spec, n=1)
        state = _Queue(len(episodes), len(engines))
        calls = _EnvCalls(self.limits.workers, self.limits.timeout_s)
        threads = [threading.Thread(target=self._engine_loop, args=(engine, turn_spec, state, calls), daemon=True,
                                    name=f"episodes-engine-{i}") for i, engine in enumerate(engines)]
        for t in threads:
            t.start()
        try:
            for ep in episodes:
                calls.submit(ep, self._reset, ep, records[ep.prompt_index], state)
            for t in threads:
                t.join()
        finally:
            calls.close()
        if state.error is not None:
            raise state.error
        return Generation(
            prompt_ids=[ep.prompt_ids for ep in episodes], response_ids=[ep.tokens for ep in episodes],
            logprobs=[ep.logprobs for ep in episodes], finish_reasons=[ep.finish or "stop" for ep in episodes],
            prompt_index=[ep.prompt_index for ep in episodes], action_masks=[ep.actions for ep in episodes],
            turn_rewards=[ep.rewards for ep in episodes], episodes=[ep.info() for ep in episodes],
            versions=None if any(ep.versions is None for ep in episodes) else [ep.versions for ep in episodes])

    # ------------------------------------------------------------------ engine threads and environment threads
    def _reset(self, ep: Episode, record: dict, state: "_Queue", calls: "_EnvCalls") -> None:
        """Build the episode's environment and reset it; the episode's first turn is then due. A
        reset that fails or overruns leaves it broken: the first turn runs, then it ends (env_error)."""
        def overran() -> None:
            ep.broken = f"reset: no answer within {self.limits.timeout_s:g} s"
            state.put([ep])

        try:
            ep.env = self.make_env()
            calls.timed(ep, lambda: ep.env.reset(dict(record)), overran)
        except _Abandoned:
            return  # ``overran`` queued the episode
        except Exception as exc:  # noqa: BLE001 - the episode ends with env_error after its first turn
            ep.broken = f"reset: {type(exc).__name__}: {exc}"
        state.put([ep])

    def _engine_loop(self, engine: EngineCall, spec: SamplingSpec, state: "_Queue", calls: "_EnvCalls") -> None:
        while True:
            due = state.take()
            if not due:
                return
            try:
                gen = engine([ep.context() for ep in due], spec).result()
            except BaseException as exc:  # noqa: BLE001 - raised by run()
                state.fail(exc)
                return
            versions = gen.versions or [None] * len(due)  # tagged by the coordinator's pipeline
            for ep, tokens, logprobs, reason, tags in zip(due, gen.response_ids, gen.logprobs, gen.finish_reasons,
                                                          versions):
                room = self.limits.max_episode_tokens - len(ep.tokens)
                cut = len(tokens) > room
                tokens, logprobs = list(tokens[:room]), list(logprobs[:room])
                if ep.versions is not None:
                    ep.versions = None if tags is None else ep.versions + list(tags[:room])
                ep.tokens += tokens
                ep.logprobs += logprobs
                ep.actions += [True] * len(tokens)
                ep.rewards += [0.0] * len(tokens)
                ep.turns += 1
                ep.last_turn = (tokens, "max_episode_tokens" if cut else reason)
                if ep.broken:  # its environment is unusable (its thread may still be stuck in reset)
                    state.finish(ep, "env_error")
                else:
                    calls.submit(ep, self._after_turn, ep, state)

    def _after_turn(self, ep: Episode, state: "_Queue", calls: "_EnvCalls") -> None:
        """The environment's answer to the turn just sampled; the episode is queued again or ends."""
        tokens, reason = ep.last_turn
        try:
            result = calls.timed(ep, lambda: ep.env.step(self.decode(tokens)), lambda: state.finish(ep, "env_timeout"))
            if not isinstance(result, StepResult):
                raise TypeError(f"step returned {type(result).__name__}, not a StepResult")
            observation = result.observation
            ids = self.encode(observation) if isinstance(observation, str) else list(observation)
            if not all(isinstance(i, int) for i in ids):
                raise TypeError("an observation must be text or a list of token ids")
        except _Abandoned:
            return  # the watchdog ended the episode (env_timeout)
        except Exception as exc:  # noqa: BLE001 - contained: this episode ends, the run goes on
            ep.broken = f"step: {type(exc).__name__}: {exc}"
            return state.finish(ep, "env_error")
        ep.tool_calls += int(result.info.get("tool_calls", 0))
        ep.tool_errors += int(result.info.get("tool_errors", 0))
        if tokens:
            ep.rewards[-1] += float(result.reward)
        if result.done:
            return state.finish(ep, "stop")
        if reason == "max_episode_tokens" or len(ep.tokens) + len(ids) >= self.limits.max_episode_tokens:
            return state.finish(ep, "max_episode_tokens")  # no room for the observation and another turn
        if ep.turns >= self.limits.max_turns:
            return state.finish(ep, "max_turns")
        ep.tokens += ids
        if ep.versions is not None:  # an observation: its turn's version (it is not trained on)
            ep.versions += (ep.versions[-1:] or [-1]) * len(ids)
        ep.logprobs += [0.0] * len(ids)
        ep.actions += [False] * len(ids)
        ep.rewards += [0.0] * len(ids)
        state.put([ep])


class _Abandoned(Exception):
    """An environment call overran its timeout; its episode was ended for it (env_timeout)."""


class _EnvCalls:
    """One thread per episode for its environment's calls, at most ``workers`` calls at once, and
    a watchdog for calls that overrun ``timeout_s``.

    A call's slot is taken before it starts and given back when it returns. When a call overruns,
    the watchdog gives its slot back and runs the call's ``on_timeout`` (which ends or queues the
    episode); the call's thread, which Python cannot stop, finishes on its own, finds itself
    abandoned and takes no further call of that episode."""

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.slots = threading.Semaphore(workers)
        self.timeout_s = timeout_s
        self.inboxes: dict[int, queue.SimpleQueue] = {}
        self.running: dict[int, tuple[float, Callable[[], None]]] = {}  # id(episode) -> (deadline, on_timeout)
        self.expired: set[int] = set()
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._watch, daemon=True, name="env-watchdog").start()

    def submit(self, ep: Episode, fn: Callable[..., None], *args) -> None:
        """Run ``fn(*args, self)`` on ``ep``'s thread (started on first use), after its earlier calls."""
        key = id(ep)
        if key not in self.inboxes:
            self.inboxes[key] = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(self.inboxes[key],), daemon=True, name="env").start()
        self.inboxes[key].put((fn, args))

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while (job := inbox.get()) is not None:
            fn, args = job
            fn(*args, self)

    def timed(self, ep: Episode, call: Callable[[], Any], on_timeout: Callable[[], None]) -> Any:
        """``call()`` within a slot and the timeout (its seconds added to ``ep.env_seconds``); raises
        :class:`_Abandoned` if it overran (``on_timeout`` has then run)."""
        key = id(ep)
        self.slots.acquire()
        with self.cond:
            self.running[key] = (time.monotonic() + self.timeout_s, on_timeout)
            self.cond.notify()
        t0 = time.perf_counter()
        try:
            return call()
        finally:
            ep.env_seconds += time.perf_counter() - t0
            with self.cond:
                abandoned = key in self.expired
                if not abandoned:
                    del self.running[key]
                    self.slots.release()
            if abandoned:
                raise _Abandoned()

    def _watch(self) -> None:
        while True:
            with self.cond:
                if self.closed:
                    return
                now, fired = time.monotonic(), []
                for key, (deadline, on_timeout) in list(self.running.items()):
                    if deadline <= now:
                        del self.running[key]
                        self.expired.add(key)
                        self.slots.release()
                        fired.append(on_timeout)
                if not fired:
                    deadlines = [d for d, _ in self.running.values()]
                    self.cond.wait(max(0.0, min(deadlines) - now) if deadlines else None)
            for on_timeout in fired:  # outside the lock: they take the episode queue's
                on_timeout()

    def close(self) -> None:
        """Stop every episode's thread after its current call, and the watchdog."""
        for inbox in self.inboxes.values():
            inbox.put(None)
        with self.cond:
            self.closed = True
            self.cond.notify()


class _Queue:
    """The episodes whose turn is due, how many are still running, and the first engine failure."""

    def __init__(self, running: int, engines: int) -> None:
        self.due: collections.deque[Episode] = collections.deque()
        self.running = running
        self.engines = engines
        self.waiting = 0  # engine threads waiting for due episodes
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def put(self, episodes: list[Episode]) -> None:
        with self.cond:
            self.due.extend(episodes)
            self.cond.notify()

    def finish(self, ep: Episode, reason: str) -> None:
        with self.cond:
            if ep.finish is not None:
                return
            ep.finish = reason
            self.running -= 1
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    def take(self) -> list[Episode]:
        """A share of the due episodes (waiting until one is due): all of them when no other engine
        is idle, else an even split with the idle ones (woken for the rest); [] once every episode
        ended or an engine failed."""
        with self.cond:
            self.waiting += 1
            while not self.due and self.running > 0 and self.error is None:
                self.cond.wait()
            self.waiting -= 1
            if self.error is not None or self.running == 0:
                return []
            share = -(-len(self.due) // (self.waiting + 1))
            due = [self.due.popleft() for _ in range(share)]
            if self.due:
                self.cond.notify()
            return due


class Background:
    """A call run in a thread of its own, as a ``Pending``: ``result()`` waits and returns its value
    or raises its exception (a multi-turn generate in flight, e.g. on the pipeline's generation thread)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name="episodes")
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised by result()
            self._box["error"] = exc

    def result(self) -> Any:
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]


def episode_metrics(gen: Generation, prefix: str = "episode/") -> dict[str, float]:
    """Turns, tool calls and errors, the observations' share of the tokens and the finish reasons
    of a batch of episodes ({} for single responses)."""
    if gen.episodes is None:
        return {}
    n = max(len(gen), 1)
    tokens = sum(len(r) for r in gen.response_ids)
    obs = sum(e["observation_tokens"] for e in gen.episodes)
    out = {"turns_mean": sum(e["turns"] for e in gen.episodes) / n,
           "tool_calls_mean": sum(e["tool_calls"] for e in gen.episodes) / n,
           "tool_call_rate": sum(e["tool_calls"] > 0 for e in gen.episodes) / n,
           "tool_errors": float(sum(e["tool_errors"] for e in gen.episodes)),
           "observation_token_share": obs / max(tokens, 1),
           "env_seconds_sum": sum(e["env_seconds"] for e in gen.episodes)}
    for reason in FINISH_REASONS:
        out[f"finish_{reason}"] = float(sum(r == reason for r in gen.finish_reasons))
    return {prefix + name: value for name, value in out.items()}


FINISH_REASONS = ("stop", "max_turns", "max_episode_tokens", "env_error", "env_timeout")
"""How an episode ends: the environment said done; a limit; a broken environment."""


def prompt_record(prompts: PromptSet, i: int) -> dict:
    """Prompt ``i``'s record as an environment's ``reset`` gets it: its text under ``prompt`` and the
    record's other fields."""
    return {"prompt": prompts.texts[i], **(prompts.fields[i] if prompts.fields else {})}


def episode_runner(cfg: Config, tokenizer) -> EpisodeRunner:
    """The runner of rollout.env's episodes: observations encoded once, without special tokens; the
    environment reads each turn decoded without them."""
    if tokenizer is None:
        raise ValueError("rollout.env needs the policy tokenizer (PPOCoordinator(..., tokenizer=...)) to encode "
                         "observations and decode turns.")
    r = cfg.rollout
    cls, args = load_env_class(r.env), dict(r.env_args)
    limits = EpisodeLimits(r.max_turns, episode_tokens(cfg), r.env_timeout_s, r.env_workers)
    return EpisodeRunner(lambda: cls(**args), lambda text: tokenizer.encode(text, add_special_tokens=False),
                         lambda ids: tokenizer.decode(ids, skip_special_tokens=True), limits)
