"""Replicated frozen roles and concurrent rewards: PPO iteration time with a slow reward.

    python -m benchmarks.frozen_scaleout                      (repository root, ~5 minutes on 2 cores)
    python -m benchmarks.frozen_scaleout --iters 3 --latency-ms 50 --quiet-wait 600

The demo config's sizes (64 samples per iteration: 8 prompts x 8 samples, 16 new tokens; tiny
Llama, eager vLLM engine, two DeepSpeed ZeRO-2 learner ranks, local Ray cluster) with a reward
function that sleeps a fixed latency per call (``--latency-ms``, 50) and gets one sample per call
(``reward.samples_per_call 1``), as a remote judge would. The roles start once, with 4 reward and 2
reference replicas; each setting runs the coordinator over the first k of them (a client over a
subset), and a new reward.concurrency replaces the reward replicas with ones built from the new
spec (``Roles.replace``), so the engine and the learners are started once for every setting.

Settings: reward replicas 1, 2, 4 x reward.concurrency 1, 8, 32 (one reference replica); then
reference replicas 1 vs 2 (reward at 4 x 32, so the reward is not what the score phase waits for).
For each:

* ``iteration_s``: median over ``--iters`` PPO iterations (``PPOCoordinator.step``; one warm-up
  iteration before the first setting), and ``score_s``, their score phase (reference logprobs,
  reward and the learners' old logprobs in flight together);
* ``reward_s``: one reward call over a fixed batch (the warm-up's), alone, median of 3; its ideal
  is the latency divided by the parallelism, in whole rounds: ceil(samples per replica /
  concurrency) x latency; ``reward_ratio`` = reward_s / ideal (1.0 is perfect);
* ``reference_s``: one reference call over the same batch, alone, median of 3; the ideal of 2
  replicas is half the 1-replica time (each replica runs one thread: on 2 cores, at best half).

The reward scores of every setting must equal those of 1 replica at concurrency 1 on the fixed
batch (``scores_match``). What it leaves out: GPUs, checkpoints, evaluation, an HTTP endpoint
(the function's calls are what reward.concurrency bounds either way). The machine is shared:
``--quiet-wait`` waits for a low load average first and the JSON records it. Saves
benchmarks/results/frozen_scaleout.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time
from typing import Any

from benchmarks import _env

REWARD_SOURCE = '''
import time

LATENCY_S = {latency}


def slow_digits(prompts, responses):
    """The demo's "answer in digits" score, after a fixed wait per call (a remote judge's latency)."""
    time.sleep(LATENCY_S)
    out = []
    for text in responses:
        chars = [c for c in text if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return out
'''

REWARD_REPLICAS, CONCURRENCY, REFERENCE_REPLICAS = (1, 2, 4), (1, 8, 32), (1, 2)


def _median_time(fn, reps: int = 3) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return _env.median(times), value


def _set_concurrency(roles, concurrency: int) -> float:
    """Replace every reward replica by one built with reward.concurrency ``concurrency``; seconds taken."""
    actor_cls, spec = roles.kinds["reward"]
    roles.kinds["reward"] = (actor_cls, dataclasses.replace(spec, reward=dataclasses.replace(spec.reward,
                                                                                         concurrency=concurrency)))
    t0 = time.perf_counter()
    for i in range(len(roles.reward.actors)):
        roles.replace(("reward", i))
    return time.perf_counter() - t0


def measure(args) -> dict[str, Any]:
    import torch

    from rlhf_ray.coordinator.loop import PPOCoordinator
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.runtime.groups import ReferenceClient, RewardClient, Roles, SharedBatch

    latency = args.latency_ms / 1000
    reward_file = os.path.join(tempfile.mkdtemp(prefix="frozen-scaleout-"), "slow_reward.py")
    with open(reward_file, "w") as fh:
        fh.write(REWARD_SOURCE.format(latency=latency))
    cfg = _env.bench_config(_env.tiny_model(), **{
        "reward.function": f"{reward_file}:slow_digits", "reward.samples_per_call": 1,
        "reward.replicas": max(REWARD_REPLICAS), "reference.replicas": max(REFERENCE_REPLICAS),
        "rollout.vllm.enforce_eager": True, "sync.check_logprobs_every": 0})
    inputs = prepare_inputs(cfg)
    _env.start_ray(num_cpus=4)
    t0 = time.perf_counter()
    roles = Roles(cfg)
    startup_s = time.perf_counter() - t0
    timeout = cfg.resources.call_timeout_s
    try:
        coord = PPOCoordinator(cfg, inputs.prompts, inputs.pad_id, inputs.eos_ids, roles.rollout, roles.reference,
                               roles.reward, roles.learners, roles.weight_sync, put=SharedBatch)

        def use(reference: int, reward: int) -> None:
            coord.reference = ReferenceClient(roles.reference.actors[:reference], timeout)
            coord.reward = RewardClient(roles.reward.actors[:reward], timeout, by_tokens=False)

        use(1, 1)
        coord.step()  # warm-up: the engine's and learners' first passes
        fixed = coord.last_batch
        B = len(fixed)
        rows, baseline, swaps = [], None, {}
        settings = [(1, r, c) for c in CONCURRENCY for r in REWARD_REPLICAS]
        settings += [(ref, max(REWARD_REPLICAS), max(CONCURRENCY)) for ref in REFERENCE_REPLICAS[1:]]
        current_c = 1
        for ref, rew, conc in settings:
            if conc != current_c:
                swaps[conc] = _set_concurrency(roles, conc)
                current_c = conc
            use(ref, rew)
            steps = [coord.step() for _ in range(args.iters)]
            reward_s, scores = _median_time(lambda: coord.reward.score(SharedBatch(fixed)).result())
            reference_s, _ = _median_time(lambda: coord.reference.logprobs(SharedBatch(fixed),
                                                                           cfg.rollout.temperature).result())
            if baseline is None:
                baseline = scores
            ideal = math.ceil(math.ceil(B / rew) / conc) * latency
            row = {"reference_replicas": ref, "reward_replicas": rew, "concurrency": conc,
                   "iteration_s": _env.median([s["time/iteration"] for s in steps]),
                   "score_s": _env.median([s["time/score"] for s in steps]),
                   "reward_s": reward_s, "ideal_reward_s": ideal, "reward_ratio": reward_s / ideal,
                   "reference_s": reference_s, "scores_match": bool(torch.equal(scores, baseline))}
            rows.append(row)
            print(f"  reference x{ref}, reward x{rew} at concurrency {conc}: iteration {row['iteration_s']:.2f} s, "
                  f"reward {reward_s:.3f} s (ideal {ideal:.3f} s)", flush=True)
    finally:
        roles.shutdown()
    return {"samples": B, "latency_s": latency, "roles_startup_s": startup_s, "concurrency_swap_s": swaps,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=2, help="timed PPO iterations per setting")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the reward function's wait per call")
    parser.add_argument("--quiet-wait", type=float, default=0.0, help="wait up to this long for load average < 1")
    parser.add_argument("--name", default="frozen_scaleout", help="results file name")
    args = parser.parse_args()
    quiet = _env.wait_for_quiet(args.quiet_wait)
    threads = _env.set_threads(1)
    t0 = time.perf_counter()
    result = measure(args)
    rows = result["rows"]
    _env.print_table(rows, ["reference_replicas", "reward_replicas", "concurrency", "iteration_s", "score_s",
                            "reward_s", "ideal_reward_s", "reward_ratio", "reference_s", "scores_match"],
                     title=f"{result['samples']} samples, reward latency {args.latency_ms:g} ms per call")

    def row(ref: int, rew: int, conc: int) -> dict:
        return next(r for r in rows if (r["reference_replicas"], r["reward_replicas"], r["concurrency"]) ==
                    (ref, rew, conc))

    slow, fast = row(1, 1, 1), row(1, 4, 32)
    ref1, ref2 = row(1, 4, 32), row(2, 4, 32)
    key = {"iteration_s_1x1": slow["iteration_s"], "iteration_s_4x32": fast["iteration_s"],
           "iteration_speedup_4x32": slow["iteration_s"] / fast["iteration_s"],
           "reward_ratio_1x1": slow["reward_ratio"], "reward_ratio_4x32": fast["reward_ratio"],
           "reference_speedup_2_replicas": ref1["reference_s"] / ref2["reference_s"],
           "scores_match": all(r["scores_match"] for r in rows)}
    _env.save_results(args.name, {"args": vars(args), "threads": threads, "quiet": quiet,
                                  "wall_s": time.perf_counter() - t0, **result}, key)


if __name__ == "__main__":
    main()
