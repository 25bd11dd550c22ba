"""PPO throughput of the whole system, by batch size, with a breakdown of where the time goes.

What it measures: for each size (prompts x samples per prompt x max new tokens), the real roles
(one vLLM engine, reference, reward function, two DeepSpeed ZeRO-2 learner ranks, gloo weight
sync: configs/demo_cpu.yaml) are started in one local Ray cluster (ray.init(address="local",
num_cpus=4)); ``PPOCoordinator.step`` runs ``--warmup`` iterations, then ``--iters`` timed ones.
Reported, as means over the timed iterations:
  * seconds per iteration, samples/s, response tokens/s (actual tokens, EOS may end responses);
  * the coordinator's phases (generate, score, advantages, update, sync; the sync after an
    update runs at the start of the next step) and the coordinator overhead = iteration - sum
    of phases, plus the wall time of ``step()`` around it (its state snapshot is outside);
  * inside the phases (role clients wrapped with timers, no source change): the rollout call's
    round trip vs packing, the ray.put of the batch, the learner slicing + ray.put at submit,
    the learners' own update time (``update_seconds``) vs the update phase;
  * CPU seconds each role's process burned per iteration (psutil on the actors' pids) and the
    share of the machine's cores that was busy (idle roles show up here);
  * at the reference size (``--dissect``), each scoring role called alone vs the three in
    parallel, the no-op round trip (``ping``) of every role, and the cost of run()'s per-iteration
    metrics sink (metrics.jsonl + TensorBoard + Ray gauges), which step() does not include.

What it leaves out: Ray start-up and role start-up (reported once per size, not in the
per-iteration numbers), checkpoints, the progress bar. Sizes are small (tiny ~200k-parameter
Llama) so fixed per-call costs dominate; that is the point on a CPU box, not GPU-scale
behaviour. The machine is shared: ``--quiet-wait`` waits for a low load average first and the
JSON records the load average.

Threads: every role runs 1 torch/OpenMP thread (demo config); the driver (coordinator) is set to
1 thread.

Run (repository root, ~3-4 minutes on 2 cores):
    .venv/bin/python -m benchmarks.ppo_throughput
    .venv/bin/python -m benchmarks.ppo_throughput --sizes 8x8x32 --iters 10 --transport object_store
    .venv/bin/python -m benchmarks.ppo_throughput --set rollout.num_engines=2 --set resources.rollout.num_cpus=0.25
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from benchmarks import _env

PHASES = ("generate", "score", "advantages", "update", "sync")


# --------------------------------------------------------------------------- timers around role clients


class _TimedPending:
    def __init__(self, inner, sink: dict, key: str, t0: float, keep: dict | None = None) -> None:
        self.inner, self.sink, self.key, self.t0, self.keep = inner, sink, key, t0, keep

    def result(self):
        value = self.inner.result()
        self.sink[self.key] = time.perf_counter() - self.t0
        if self.keep is not None:
            self.keep["value"] = value
        return value


class Timed:
    """Wraps a role client: records each call's submit time and submit->result time in ``sink``."""

    def __init__(self, inner, sink: dict, label: str, keep: dict | None = None) -> None:
        self._inner, self._sink, self._label, self._keep = inner, sink, label, keep

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = attr(*args, **kwargs)
            key = f"{self._label}.{name}"
            self._sink[key + ".submit"] = time.perf_counter() - t0
            if hasattr(out, "result"):
                return _TimedPending(out, self._sink, key + ".done", t0, self._keep)
            return out

        return call


# --------------------------------------------------------------------------- CPU accounting


def _role_pids(roles) -> dict[str, int]:
    return {label: int(info["pid"]) for label, info in roles.placement.items()}


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for label, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[label] = t.user + t.system
        except psutil.Error:
            out[label] = float("nan")
    return out


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all cores from /proc/stat."""
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# --------------------------------------------------------------------------- one size


def parse_size(text: str) -> tuple[int, int, int]:
    p, n, t = (int(x) for x in text.lower().split("x"))
    return p, n, t


def add_size_args(ap: argparse.ArgumentParser, name: str) -> None:
    """The run settings this benchmark and single_process_floor share (read by size_config)."""
    ap.add_argument("--sizes", default="4x8x16,8x8x32,16x8x32",
                    help="comma list of PROMPTSxSAMPLESxTOKENS (default 32x16, 64x32, 128x32 samples x tokens)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=2, help="learner ranks")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--transport", default="collective", choices=("collective", "object_store"))
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="max seconds to wait for load average < 1")
    ap.add_argument("--name", default=name)
    ap.add_argument("--set", action="append", default=[], metavar="DOTTED=VALUE",
                    help="any config override, e.g. --set rollout.num_engines=2 (repeatable)")


def size_config(model: str, prompts: int, samples: int, tokens: int, args) -> Any:
    per_rank_mini = prompts * samples // args.mini_batches // args.ranks
    return _env.bench_config(model, **{
        "rollout.prompts_per_iteration": prompts, "rollout.samples_per_prompt": samples,
        "rollout.max_new_tokens": tokens, "ppo.mini_batches": args.mini_batches, "ppo.epochs": args.epochs,
        "learner.num_ranks": args.ranks, "learner.zero_stage": args.zero_stage,
        "learner.micro_batch_size": min(16, per_rank_mini), "sync.transport": args.transport,
        **dict(kv.split("=", 1) for kv in args.set),
    })


def start_roles(cfg):
    """Roles (retrying briefly while the previous size's actor names are released)."""
    from rlhf_ray.runtime.groups import Roles

    for attempt in range(10):
        try:
            return Roles(cfg)
        except ValueError as exc:  # "actor name already taken" right after a kill
            if "already" not in str(exc) or attempt == 9:
                raise
            time.sleep(1.0)


def coordinator_steps(cfg, iterations: int) -> list[dict]:
    """``iterations`` PPO steps on freshly started roles (shut down afterwards): their metric rows.
    Starts the private Ray cluster if it is not running."""
    from benchmarks import _env
    from rlhf_ray.coordinator.loop import PPOCoordinator
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.runtime.groups import SharedBatch

    inputs = prepare_inputs(cfg)
    _env.start_ray(num_cpus=4)
    roles = start_roles(cfg)
    try:
        coord = PPOCoordinator(cfg, inputs.prompts, inputs.pad_id, inputs.eos_ids, roles.rollout, roles.reference,
                               roles.reward, roles.learners, roles.weight_sync, put=SharedBatch)
        try:
            return [coord.step() for _ in range(iterations)]
        finally:
            coord.close()  # the pipeline's threads (rollout.max_staleness >= 1) stop before the roles
    finally:
        roles.shutdown()


def run_size(model: str, size: tuple[int, int, int], args, dissect: bool) -> dict[str, Any]:
    from rlhf_ray.coordinator.loop import PPOCoordinator
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.runtime.groups import SharedBatch

    prompts, samples, tokens = size
    cfg = size_config(model, prompts, samples, tokens, args)
    inputs = prepare_inputs(cfg)
    t0 = time.perf_counter()
    roles = start_roles(cfg)
    startup_s = time.perf_counter() - t0
    sub: dict[str, float] = {}
    last_gen: dict = {}

    def timed_put(x):
        t = time.perf_counter()
        shared = SharedBatch(x)
        shared.whole()  # the object both one-replica roles read, put here to time it
        sub["score.put"] = time.perf_counter() - t
        return shared

    coord = PPOCoordinator(cfg, inputs.prompts, inputs.pad_id, inputs.eos_ids,
                           Timed(roles.rollout, sub, "rollout", keep=last_gen), Timed(roles.reference, sub, "reference"),
                           Timed(roles.reward, sub, "reward"), Timed(roles.learners, sub, "learners"),
                           Timed(roles.weight_sync, sub, "sync"), put=timed_put)
    try:
        for _ in range(args.warmup):
            coord.step()
        pids = _role_pids(roles)
        cpu0, busy0, wall0 = _cpu_seconds(pids), _machine_busy(), time.perf_counter()
        driver0 = sum(os.times()[:2])
        rows, subs = [], []
        for _ in range(args.iters):
            sub.clear()
            t_step = time.perf_counter()
            row = coord.step()
            row["bench/step_wall"] = time.perf_counter() - t_step
            rows.append(row)
            subs.append(dict(sub))
        wall = time.perf_counter() - wall0
        cpu1, busy1 = _cpu_seconds(pids), _machine_busy()
        driver_cpu = sum(os.times()[:2]) - driver0
        cores = os.cpu_count() or 1
        cpu_per_iter = {k: (cpu1[k] - cpu0[k]) / args.iters for k in pids}
        cpu_per_iter["driver (coordinator)"] = driver_cpu / args.iters
        result = summarize(rows, subs, size, startup_s)
        result["cpu_seconds_per_iteration"] = cpu_per_iter
        result["roles_cpu_share_of_machine"] = sum(cpu_per_iter.values()) * args.iters / (wall * cores)
        result["machine_busy_share"] = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1e-9)
        result["iterations"] = [{k: v for k, v in r.items() if k != "prompt_indices"} for r in rows]
        result["sub_timings"] = subs
        if dissect:
            result["dissection"] = dissect_roles(roles, coord, last_gen["value"], inputs, cfg, rows[-1])
        return result
    finally:
        roles.shutdown()


def summarize(rows: list[dict], subs: list[dict], size: tuple[int, int, int], startup_s: float) -> dict[str, Any]:
    m = _env.mean
    it = m([r["time/iteration"] for r in rows])
    phases = {p: m([r.get(f"time/{p}", 0.0) for r in rows]) for p in PHASES}
    overhead = m([r["time/iteration"] - sum(r.get(f"time/{p}", 0.0) for p in PHASES) for r in rows])
    wall = m([r["bench/step_wall"] for r in rows])

    def sub_mean(key: str) -> float:
        return m([s[key] for s in subs if key in s])

    gen_rt = sub_mean("rollout.generate.done")
    upd_inside = m([r["update_seconds"] for r in rows])
    return {
        "prompts": size[0], "samples_per_prompt": size[1], "max_new_tokens": size[2],
        "samples": m([r["samples"] for r in rows]), "response_tokens": m([r["response_tokens"] for r in rows]),
        "mean_response_length": m([r["response_length"] for r in rows]),
        "roles_startup_s": startup_s,
        "iteration_s": it, "iteration_s_std": _env.stdev([r["time/iteration"] for r in rows]),
        "samples_per_s": m([r["samples"] for r in rows]) / it,
        "tokens_per_s": m([r["response_tokens"] for r in rows]) / it,
        "phases_s": phases, "coordinator_overhead_s": overhead,
        # step() = state snapshot + _step(); time/iteration is measured inside _step()
        "step_wall_s": wall, "step_outside_iteration_s": wall - it,
        "inside_phases_s": {
            "generate.rollout_round_trip": gen_rt,
            "generate.pack_and_rest": phases["generate"] - gen_rt,
            "score.ray_put_batch": sub_mean("score.put"),
            "score.learners_slice_and_put (submit)": sub_mean("learners.compute_old.submit"),
            "score.compute_old_done": sub_mean("learners.compute_old.done"),
            "score.reference_done": sub_mean("reference.logprobs.done"),
            "score.reward_done": sub_mean("reward.score.done"),
            "update.learners_slice_and_put (submit)": sub_mean("learners.train.submit"),
            "update.inside_ranks (update_seconds)": upd_inside,
            "update.ray_and_wait_overhead": phases["update"] - upd_inside,
        },
    }


def dissect_roles(roles, coord, gen, inputs, cfg, last_metrics: dict) -> dict[str, Any]:
    """Each scoring role alone vs together, no-op round trips, and run()'s metrics sink."""
    import tempfile

    import ray

    from rlhf_ray.batch import pack_generation
    from rlhf_ray.runtime.groups import SharedBatch
    from rlhf_ray.runtime.metrics import MetricsSink

    reps = 3
    batch = pack_generation(gen, inputs.pad_id, inputs.eos_ids)
    temp = cfg.rollout.temperature
    out: dict[str, Any] = {}
    t = time.perf_counter()
    for _ in range(reps):
        pack_generation(gen, inputs.pad_id, inputs.eos_ids)
    out["pack_generation_s"] = (time.perf_counter() - t) / reps

    def timeit(fn) -> float:
        xs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
        return _env.median(xs)

    ref = SharedBatch(batch)
    alone = {
        "reference.logprobs": timeit(lambda: roles.reference.logprobs(ref, temp).result()),
        "reward.score": timeit(lambda: roles.reward.score(ref).result()),
        "learners.compute_old": timeit(lambda: roles.learners.compute_old(batch).result()),
    }
    out["score_alone_s"] = alone
    out["score_alone_sum_s"] = sum(alone.values())
    out["score_alone_max_s"] = max(alone.values())
    out["score_together_s"] = timeit(lambda: coord._score(batch))
    out["ray_put_batch_s"] = timeit(lambda: ray.put(batch))
    pings = {}
    for source, actor in roles.labelled_actors():
        label = source if isinstance(source, str) else "-".join(str(x) for x in source)
        ray.get(actor.ping.remote())
        xs = []
        for _ in range(20):
            t0 = time.perf_counter()
            ray.get(actor.ping.remote())
            xs.append(time.perf_counter() - t0)
        pings[label] = _env.median(xs)
    out["ping_round_trip_s"] = pings
    with tempfile.TemporaryDirectory() as tmp:
        sink = MetricsSink(tmp, tensorboard=True)
        xs = []
        for i in range(5):
            row = dict(last_metrics, iteration=last_metrics["iteration"] + i)
            t0 = time.perf_counter()
            sink.write(row)
            xs.append(time.perf_counter() - t0)
        sink.close()
    out["run_metrics_sink_write_s"] = _env.median(xs[1:])
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_args(ap, "ppo_throughput")
    ap.add_argument("--dissect-size", default="8x8x32", help="size at which to run the role dissection ('' = none)")
    args = ap.parse_args()

    threads = _env.set_threads(1)
    quiet = _env.wait_for_quiet(args.quiet_wait)
    model = _env.tiny_model()
    _env.start_ray(num_cpus=4)
    results = []
    for text in args.sizes.split(","):
        size = parse_size(text)
        print(f"--- size {text}: {size[0] * size[1]} samples x {size[2]} tokens", flush=True)
        results.append(run_size(model, size, args, dissect=text == args.dissect_size))
        r = results[-1]
        print(f"    {r['iteration_s']:.2f} s/it, {r['samples_per_s']:.1f} samples/s, "
              f"startup {r['roles_startup_s']:.1f} s", flush=True)

    rows = [{"samples x tok": f"{int(r['samples'])}x{r['max_new_tokens']}", "resp_tok": r["response_tokens"],
             "s/it": r["iteration_s"], "samples/s": r["samples_per_s"], "tok/s": r["tokens_per_s"],
             **{p: r["phases_s"][p] for p in PHASES}, "overhead": r["coordinator_overhead_s"],
             "step() wall": r["step_wall_s"]} for r in results]
    _env.print_table(rows, title="\nPPO iteration (means over timed iterations; seconds)")
    labels = [f"{int(r['samples'])}x{r['max_new_tokens']}" for r in results]
    inner = [{"inside the phases (s)": k, **{lab: r["inside_phases_s"][k] for lab, r in zip(labels, results)}}
             for k in results[0]["inside_phases_s"]]
    _env.print_table(inner, title="")
    procs = list(results[0]["cpu_seconds_per_iteration"])
    cpu_rows = [{"CPU s per iteration": k, **{lab: r["cpu_seconds_per_iteration"][k] for lab, r in zip(labels, results)}}
                for k in procs]
    cpu_rows.append({"CPU s per iteration": "share of cores busy (roles+driver)",
                     **{lab: r["roles_cpu_share_of_machine"] for lab, r in zip(labels, results)}})
    cpu_rows.append({"CPU s per iteration": "share of cores busy (whole machine)",
                     **{lab: r["machine_busy_share"] for lab, r in zip(labels, results)}})
    _env.print_table(cpu_rows, title="")
    for r in results:
        if "dissection" in r:
            d = r["dissection"]
            print(f"\ndissection at {int(r['samples'])}x{r['max_new_tokens']}:")
            for k, v in d.items():
                print(f"  {k}: {v}")

    key = {f"{int(r['samples'])}x{r['max_new_tokens']}": {"s_per_it": round(r["iteration_s"], 4),
                                                          "samples_per_s": round(r["samples_per_s"], 2)}
           for r in results}
    _env.save_results(args.name, {"args": vars(args), "threads": {"driver": threads, "roles": 1}, "load": quiet,
                                  "loadavg_end": _env.loadavg(), "sizes": results}, key)


if __name__ == "__main__":
    main()
