"""Concurrent episodes: one iteration of 3-turn tool episodes, tool calls one at a time vs in parallel.

    python -m benchmarks.episodes                       (repository root, ~4 minutes on 2 cores)
    python -m benchmarks.episodes --latency-ms 50 --repeats 5 --quiet-wait 600

One iteration's worth of episodes at the demo's sizes (8 prompts x 8 samples = 64 episodes, 16 new
tokens per turn) on a real vLLM engine in this process (``RolloutEngine``, tiny Llama, the demo
config's engine settings, 1 thread; no Ray), run by the coordinator's own ``EpisodeRunner`` as
``coordinator/loop.py`` builds it (``episode_runner(cfg, tokenizer)``). The environment
(:class:`SleepyTool`) is a tool that sleeps ``--latency-ms`` (50) per call, as a remote tool would:
it answers the first two turns of every episode with a short observation and ends the episode on
the third, so each episode has 3 turns and 2 tool calls, whatever the random model writes.

Settings, run in turn within each repeat (so load from other processes hits them alike):

* ``sequential``: the same runner with one tool call at a time, given one episode at a time (64
  calls of ``run``): nothing overlaps, each generate call holds one turn. Its wall time is the
  measured sum of engine time and tool latencies, the time an iteration would take without
  concurrent episodes;
* ``workers=K`` for K in 1, 4, 16 (``rollout.env_workers``: tool calls at once): all 64 episodes
  in one ``run``; the engine generates the turns of every due episode in one call while the tools
  of the others run.

Reported per setting, medians over ``--repeats`` after one warm-up round of every setting: wall
seconds, episodes/s, the sum of all tool latencies of the iteration (measured by the runner:
``episode/env_seconds_sum`` of ``episode_metrics``), the engine time (sum of the generate calls'
wall time; one engine, so this is its busy time), the generate calls and their mean batch, and
wall / tool sum and wall / (engine + tool sum). The tool sum is more than the sleeps alone (at the
defaults 64 x 2 x 50 ms = 6.4 s): the runner times each environment step as a whole, so ``step
+ms`` is what it counts per step (3 per episode) beyond the sleep (a thread per call, decoding the
turn, encoding the observation, waiting for the interpreter lock while the engine runs). Every
episode must end with 3 turns, 2 tool calls and finish reason ``stop`` (the environment's done),
else the benchmark stops with an error.

What it leaves out: Ray (the engine is called in this process, as an engine callable of the runner
returning ``Done``), scoring and training, several engines, tools that use CPU (the sleep holds no
core, so tool calls at once cost nothing here; a real tool may). Saves
benchmarks/results/episodes.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from benchmarks import _env
from rlhf_ray.envs.base import StepResult

TURNS, TOOL_CALLS = 3, 2
WORKERS = (1, 4, 16)


class SleepyTool:
    """A tool with a fixed latency: turns 1 and 2 are tool calls (a sleep, then a short result as the
    observation), turn 3 is the answer (the episode ends). The turn's text is not read."""

    def __init__(self, latency_ms: float = 50.0) -> None:
        self.latency_s = latency_ms / 1000.0
        self.calls = 0

    def reset(self, record: dict) -> None:
        self.calls = 0

    def step(self, text: str) -> StepResult:
        if self.calls >= TOOL_CALLS:
            return StepResult(done=True)
        self.calls += 1
        time.sleep(self.latency_s)
        return StepResult(f"\nresult {self.calls}: 42\n", info={"tool_calls": 1})


class TimedEngine:
    """``RolloutEngine.generate`` as an engine callable of the runner (returns ``Done``), keeping
    each call's size and wall time."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.calls: list[tuple[int, float]] = []

    def __call__(self, prompt_ids: list[list[int]], spec):
        from rlhf_ray.runtime.pending import Done

        t0 = time.perf_counter()
        gen = self.engine.generate(prompt_ids, list(range(len(prompt_ids))), spec)
        self.calls.append((len(prompt_ids), time.perf_counter() - t0))
        return Done(gen)


def make_config(model: str, latency_ms: float, workers: int):
    # Budget: 3 turns of 16 tokens and 2 short observations fit in 64 tokens; 48 prompt tokens + 64 = 128.
    return _env.bench_config(model, **{"rollout.env": "benchmarks.episodes:SleepyTool",
                                       "rollout.env_args": {"latency_ms": latency_ms}, "rollout.max_turns": TURNS,
                                       "rollout.max_episode_tokens": 64, "rollout.env_workers": workers,
                                       "rollout.prompts_per_iteration": 8, "rollout.samples_per_prompt": 8,
                                       "rollout.max_new_tokens": 16})


def check_episodes(gen, expected: int, setting: str) -> None:
    """Every episode had 3 turns, 2 tool calls and ended with the environment's done."""
    if len(gen) != expected:
        raise RuntimeError(f"{setting}: {len(gen)} episodes, expected {expected}")
    bad = [(i, e["turns"], e["tool_calls"], reason, e.get("error")) for i, (e, reason)
           in enumerate(zip(gen.episodes, gen.finish_reasons))
           if e["turns"] != TURNS or e["tool_calls"] != TOOL_CALLS or reason != "stop"]
    if bad:
        raise RuntimeError(f"{setting}: {len(bad)} of {expected} episodes did not run {TURNS} turns with "
                           f"{TOOL_CALLS} tool calls and end with 'stop' (index, turns, tool calls, finish reason, "
                           f"error), first ones: {bad[:5]}")


def run_setting(runner, engine: TimedEngine, prompt_ids, records, spec, one_at_a_time: bool):
    """One iteration's episodes; (wall seconds, the episodes)."""
    from rlhf_ray.batch import Generation

    engine.calls.clear()
    t0 = time.perf_counter()
    if one_at_a_time:
        one = dataclasses.replace(spec, n=1)
        gen = Generation.concat([runner.run([engine], [ids], [rec], one)
                                 for ids, rec in zip(prompt_ids, records) for _ in range(spec.n)])
    else:
        gen = runner.run([engine], prompt_ids, records, spec)
    return time.perf_counter() - t0, gen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-ms", type=float, default=50.0, help="each tool call's sleep")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--name", default="episodes")
    args = ap.parse_args()

    model = _env.tiny_model()
    cfg = make_config(model, args.latency_ms, 1)
    from rlhf_ray.backends.rollout import RolloutSpec, SamplingSpec, rollout_env

    engine_spec = RolloutSpec.from_config(cfg)
    env_vars = rollout_env(engine_spec)
    os.environ.update(env_vars)  # before vllm is imported, as the actor's runtime_env does
    threads = _env.set_threads(cfg.resources.rollout.threads)
    quiet = _env.wait_for_quiet(args.quiet_wait)

    from transformers import AutoTokenizer

    from rlhf_ray.coordinator.episodes import episode_metrics
    from rlhf_ray.coordinator.loop import episode_runner, prompt_record
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.workers.rollout import RolloutEngine

    inputs = prepare_inputs(cfg)
    tokenizer = inputs.tokenizer or AutoTokenizer.from_pretrained(cfg.model.path)
    t0 = time.perf_counter()
    engine = TimedEngine(RolloutEngine(engine_spec, 0))
    engine_start_s = time.perf_counter() - t0
    _env.set_threads(cfg.resources.rollout.threads)
    # The coordinator's ordinary iteration: no logprobs asked (only sync-check iterations ask).
    spec = dataclasses.replace(SamplingSpec.from_config(cfg), logprobs=False)
    n_prompts = cfg.rollout.prompts_per_iteration
    prompt_ids = [inputs.prompts.token_ids[i] for i in range(n_prompts)]
    records = [prompt_record(inputs.prompts, i) for i in range(n_prompts)]
    n_episodes = n_prompts * spec.n

    settings = {"sequential": (1, True), **{f"workers={k}": (k, False) for k in WORKERS}}
    runners = {name: episode_runner(make_config(model, args.latency_ms, k), tokenizer)
               for name, (k, _) in settings.items()}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for rep in range(1 + args.repeats):  # round 0 warms every setting up (and the engine's batch sizes)
        for name, (k, one_at_a_time) in settings.items():
            wall, gen = run_setting(runners[name], engine, prompt_ids, records, spec, one_at_a_time)
            check_episodes(gen, n_episodes, name)
            metrics = episode_metrics(gen)
            run = {"wall_s": wall, "tool_sum_s": metrics["episode/env_seconds_sum"],
                   "engine_s": sum(s for _, s in engine.calls), "generate_calls": len(engine.calls),
                   "generate_batch_mean": _env.mean([b for b, _ in engine.calls]),
                   "response_tokens": sum(len(r) for r in gen.response_ids),
                   "observation_token_share": metrics["episode/observation_token_share"]}
            print(f"round {rep}{' (warm-up)' if rep == 0 else ''} {name}: {wall:.2f} s, tools "
                  f"{run['tool_sum_s']:.2f} s, engine {run['engine_s']:.2f} s in {run['generate_calls']} calls",
                  flush=True)
            if rep > 0:
                runs[name].append(run)

    results = []
    for name, (k, one_at_a_time) in settings.items():
        med = {key: _env.median([r[key] for r in runs[name]]) for key in runs[name][0]}
        results.append({"setting": name, "env_workers": k, "one_episode_at_a_time": one_at_a_time, **med,
                        "wall_s_all": [r["wall_s"] for r in runs[name]],
                        "episodes_per_s": n_episodes / med["wall_s"],
                        "tool_sum_over_workers_s": med["tool_sum_s"] / k,
                        "wall_over_tool_sum": med["wall_s"] / med["tool_sum_s"],
                        "wall_over_engine_plus_tool_sum": med["wall_s"] / (med["engine_s"] + med["tool_sum_s"])})
    seq = results[0]["wall_s"]
    nominal = n_episodes * TOOL_CALLS * args.latency_ms / 1000.0  # the sleeps alone
    for r in results:
        r["speedup_over_sequential"] = seq / r["wall_s"]
        # What the runner counts per step beyond the sleep: its thread per call, decoding the turn,
        # encoding the observation, and waiting for the interpreter lock while the engine runs.
        r["step_overhead_ms"] = (r["tool_sum_s"] - nominal) / (n_episodes * TURNS) * 1000.0

    rows = [{"setting": r["setting"], "wall s": r["wall_s"], "episodes/s": r["episodes_per_s"],
             "tool sum s": r["tool_sum_s"], "tool sum/K s": r["tool_sum_over_workers_s"], "engine s": r["engine_s"],
             "step +ms": r["step_overhead_ms"], "gen calls": r["generate_calls"], "batch": r["generate_batch_mean"],
             "wall/tools": r["wall_over_tool_sum"], "wall/(eng+tools)": r["wall_over_engine_plus_tool_sum"],
             "vs seq": r["speedup_over_sequential"]} for r in results]
    _env.print_table(rows, title=f"\n{n_episodes} episodes x {TURNS} turns ({TOOL_CALLS} tool calls of "
                                 f"{args.latency_ms:g} ms each), {spec.max_new_tokens} new tokens per turn; medians of "
                                 f"{args.repeats} after a warm-up (K = tool calls at once)")
    key = {r["setting"]: {"wall_s": round(r["wall_s"], 3), "episodes_per_s": round(r["episodes_per_s"], 1),
                          "wall_over_tool_sum": round(r["wall_over_tool_sum"], 3)} for r in results}
    _env.save_results(args.name, {"args": vars(args), "threads": threads, "load": quiet, "loadavg_end": _env.loadavg(),
                                  "engine_env": env_vars, "engine_start_s": engine_start_s,
                                  "enforce_eager": cfg.rollout.vllm.enforce_eager, "episodes": n_episodes,
                                  "turns": TURNS, "tool_calls_per_episode": TOOL_CALLS, "tool_sleep_sum_s": nominal,
                                  "max_new_tokens": spec.max_new_tokens, "settings": results,
                                  "runs": runs}, key)


if __name__ == "__main__":
    main()
