"""Weight sync (learner rank 0 -> vLLM engine): seconds per sync vs bytes, against the link's limits.

What it measures, for each model size (tiny Llamas built with ``build_tiny_model``: hidden 64 x 2
layers, 256 x 4, 512 x 4 by default) and each transport (``collective``: gloo broadcast of
flat buckets; ``object_store``: flat numpy arrays through Ray's object store):
  * ``WeightSync.sync()`` end to end, as the coordinator's sync phase calls it (median of
    ``--repeats`` after ``--warmup``), with 2 DeepSpeed ZeRO-2 learner ranks and one engine;
  * the same calls issued by hand to read what each side reports (learner: gather + send or
    export; engine: receive or fetch + decode + vLLM ``reload_weights`` + prefix-cache reset);
  * the limits on this machine for the same number of bytes:
      - memcpy: ``dst.copy_(src)`` of one float32 tensor in one process (1 thread);
      - raw gloo: one ``broadcast`` of one flat tensor between two Ray actors (the same
        ``new_sync_group`` primitive, nothing else);
      - raw object store: ``ray.put`` of one numpy array in one actor + ``ray.get`` in another
        (zero-copy: what the object-store transport ships), and of a ``bytes`` object (copied);
      - vLLM load floor: ``reload_weights`` of the same state dict into an in-process engine
        (no transport at all) + ``reset_prefix_cache``.
Reported: sync seconds, bytes, effective GB/s, and sync / limit for each limit.

What it leaves out: ZeRO-3 gathering (``--zero-stage 3`` to include it), several engines,
multiple nodes (all here is one machine: the "link" is loopback TCP and shared memory).

Threads: every actor 1 thread (demo config); the driver 1 thread.

Run (repository root, ~3 minutes on 2 cores):
    .venv/bin/python -m benchmarks.weight_sync
    .venv/bin/python -m benchmarks.weight_sync --models 64x2,512x4,1024x4 --repeats 9
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from typing import Any

import ray
import torch

from benchmarks import _env


@ray.remote(num_cpus=0.25)
class LinkPeer:
    """One end of the raw links (gloo broadcast, object store)."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.group = None

    def address(self) -> tuple[str, int]:
        from rlhf_ray.weight_sync.transport import free_port

        return ray.util.get_node_ip_address(), free_port()

    def join(self, addr: str, port: int, rank: int) -> None:
        from rlhf_ray.weight_sync.transport import new_sync_group

        self.group = new_sync_group(addr, port, rank, 2, "gloo", 120.0)

    def broadcast(self, nbytes: int, reps: int) -> list[float]:
        flat = torch.ones(nbytes // 4, dtype=torch.float32)
        tick = torch.zeros(1)
        out = []
        for _ in range(reps):
            self.group.broadcast(tick, 0).wait()  # line both ends up before timing
            t0 = time.perf_counter()
            self.group.broadcast(flat, 0).wait()
            out.append(time.perf_counter() - t0)
        return out

    def put(self, nbytes: int, kind: str) -> tuple[list, float]:
        import numpy as np

        data = np.ones(nbytes, dtype=np.uint8)
        obj = data if kind == "numpy" else data.tobytes()
        t0 = time.perf_counter()
        ref = ray.put(obj)
        return [ref], time.perf_counter() - t0

    def get(self, refs: list) -> float:
        t0 = time.perf_counter()
        value = ray.get(refs[0])
        if isinstance(value, bytes):
            _ = len(value)
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- limits


def memcpy_seconds(nbytes: int, reps: int) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    xs = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        xs.append(time.perf_counter() - t0)
    return _env.median(xs[1:])


def raw_links(nbytes: int, reps: int) -> dict[str, float]:
    a, b = LinkPeer.remote(), LinkPeer.remote()
    try:
        addr, port = ray.get(a.address.remote())
        ray.get([a.join.remote(addr, port, 0), b.join.remote(addr, port, 1)])
        _, recv = ray.get([a.broadcast.remote(nbytes, reps + 1), b.broadcast.remote(nbytes, reps + 1)])
        out = {"gloo_broadcast_s": _env.median(recv[1:])}
        for kind in ("numpy", "bytes"):
            totals = []
            for _ in range(reps + 1):
                refs, put_s = ray.get(a.put.remote(nbytes, kind))
                get_s = ray.get(b.get.remote(refs))
                totals.append(put_s + get_s)
                del refs
            out[f"object_store_{kind}_put_get_s"] = _env.median(totals[1:])
        return out
    finally:
        ray.kill(a)
        ray.kill(b)


def vllm_load_floor(cfg, model_path: str, reps: int) -> float:
    """reload_weights of the checkpoint's tensors into an in-process engine, no transport."""
    from safetensors.torch import load_file
    from vllm import LLM

    from rlhf_ray.backends.rollout import RolloutSpec
    from rlhf_ray.backends.vllm import _QuietBenignReload, engine_kwargs

    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QuietBenignReload())
    kwargs = engine_kwargs(RolloutSpec.from_config(cfg), model_path, seed=0)
    kwargs.pop("worker_extension_cls", None)
    llm = LLM(**kwargs)
    state = {}
    for name in sorted(os.listdir(model_path)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(model_path, name)))
    xs = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        llm.reset_prefix_cache()
        xs.append(time.perf_counter() - t0)
    del llm
    return _env.median(xs[1:])


# --------------------------------------------------------------------------- the system's sync


def start_sync_roles(cfg):
    from rlhf_ray.backends.rollout import RolloutSpec
    from rlhf_ray.backends.vllm import engine_env
    from rlhf_ray.runtime.cluster import base_env
    from rlhf_ray.runtime.groups import LearnerGroup
    from rlhf_ray.workers.actors import LearnerActor, RolloutActor
    from rlhf_ray.workers.learner import LearnerSpec

    res = cfg.resources
    engine = RolloutActor.options(num_cpus=res.rollout.num_cpus, max_concurrency=1, runtime_env={
        "env_vars": {**base_env(res.rollout.threads), **engine_env(RolloutSpec.from_config(cfg))}}).remote(
        RolloutSpec.from_config(cfg), 0)
    n = cfg.learner.num_ranks
    actors = [LearnerActor.options(num_cpus=res.learner.num_cpus, max_concurrency=1, runtime_env={
        "env_vars": base_env(res.learner.threads)}).remote(LearnerSpec.from_config(cfg), i) for i in range(n)]
    learners = LearnerGroup(actors, res.call_timeout_s)
    learners.setup().result()
    ray.get(engine.ping.remote())
    return engine, learners


def by_hand(ws, transport: str, reps: int) -> dict[str, float]:
    """The calls WeightSync.sync makes, keeping what each side reports."""
    send, recv, export = [], [], []
    for _ in range(reps):
        if transport == "collective":
            refs = [a.broadcast_weights.remote(ws.buckets) for a in ws.learners.actors]
            refs += [e.receive_broadcast.remote(ws.buckets) for e in ws.engines]
            out = ray.get(refs)
            send.append(out[0]["seconds"])
            recv.append(out[-1]["seconds"])
        else:
            t0 = time.perf_counter()
            ref_lists = ray.get([a.export_arrays.remote(ws.buckets) for a in ws.learners.actors])
            export.append(time.perf_counter() - t0)
            recv.append(ray.get(ws.engines[0].load_arrays.remote(ws.buckets, ref_lists[0]))["seconds"])
    if transport == "collective":
        return {"learner_gather_and_send_s": _env.median(send), "engine_receive_and_load_s": _env.median(recv)}
    return {"learner_export_round_trip_s": _env.median(export), "engine_fetch_decode_load_s": _env.median(recv)}


def run_model(hidden: int, layers: int, args) -> dict[str, Any]:
    from rlhf_ray.runtime.groups import WeightSync
    from rlhf_ray.tiny_models import count_parameters

    path = _env.tiny_model(f"llama-h{hidden}-l{layers}", hidden_size=hidden, num_layers=layers)
    overrides = {"learner.zero_stage": args.zero_stage, "learner.num_ranks": 2, "sync.transport": "collective"}
    if args.bucket_mb is not None:
        overrides["sync.bucket_mb"] = args.bucket_mb
    if args.enforce_eager is not None:
        overrides["rollout.vllm.enforce_eager"] = args.enforce_eager == "true"
    cfg = _env.bench_config(path, **overrides)
    engine, learners = start_sync_roles(cfg)
    out: dict[str, Any] = {"model": f"h{hidden}x{layers}", "parameters": count_parameters(path)}
    try:
        for transport in ("collective", "object_store"):
            tcfg = dataclasses.replace(cfg, sync=dataclasses.replace(cfg.sync, transport=transport))
            ws = WeightSync(tcfg, learners, [engine])
            for _ in range(args.warmup):
                ws.sync()
            xs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ws.sync()
                xs.append(time.perf_counter() - t0)
            out[transport] = {"sync_s": _env.median(xs), "all_s": xs, "buckets": len(ws.buckets),
                              **by_hand(ws, transport, args.repeats)}
            out["bytes"] = ws.nbytes
            out["tensors"] = sum(len(b.specs) for b in ws.buckets)
    finally:
        for a in [engine, *learners.actors]:
            ray.kill(a)
    nbytes = out["bytes"]
    out["limits"] = {"memcpy_s": memcpy_seconds(nbytes, args.repeats), **raw_links(nbytes, args.repeats)}
    if args.load_floor:
        out["limits"]["vllm_reload_in_process_s"] = vllm_load_floor(cfg, path, args.repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="64x2,256x4,512x4", help="HIDDENxLAYERS list of tiny Llamas")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=None, help="sync.bucket_mb (default: the config's)")
    ap.add_argument("--enforce-eager", choices=("true", "false"), default=None,
                    help="rollout.vllm.enforce_eager for the engines (default: the demo config's, false: compiled)")
    ap.add_argument("--no-load-floor", dest="load_floor", action="store_false",
                    help="skip the in-process vLLM reload floor")
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--name", default="weight_sync")
    args = ap.parse_args()

    from rlhf_ray.backends.rollout import RolloutSpec
    from rlhf_ray.backends.vllm import engine_env

    threads = _env.set_threads(1)
    quiet = _env.wait_for_quiet(args.quiet_wait)
    models = [tuple(int(x) for x in m.split("x")) for m in args.models.split(",")]
    base_cfg = _env.bench_config(_env.tiny_model())
    os.environ.update(engine_env(RolloutSpec.from_config(base_cfg)))  # for the in-process load floor, before vllm is imported
    _env.set_threads(1)
    _env.start_ray(num_cpus=4)
    results = [run_model(h, layer_count, args) for h, layer_count in models]

    rows = []
    for r in results:
        lim, gb = r["limits"], r["bytes"] / 1e9
        for transport, raw_key in (("collective", "gloo_broadcast_s"), ("object_store", "object_store_numpy_put_get_s")):
            s = r[transport]["sync_s"]
            rows.append({"model": r["model"], "params": r["parameters"], "MB": r["bytes"] / 1e6, "transport": transport,
                         "sync s": s, "GB/s": gb / s, "raw link s": lim[raw_key], "sync/raw": s / lim[raw_key],
                         "memcpy s": lim["memcpy_s"], "sync/memcpy": s / lim["memcpy_s"],
                         "vllm reload s": lim.get("vllm_reload_in_process_s", float("nan")),
                         "sync/reload": s / lim.get("vllm_reload_in_process_s", float("nan"))})
    _env.print_table(rows, title=f"\nweight sync, medians of {args.repeats} (raw link: gloo broadcast for collective, "
                                 "put+get of a numpy array for object_store)")
    detail = []
    for r in results:
        detail.append({"model": r["model"], **{f"collective {k}": v for k, v in r["collective"].items()
                                               if k.endswith("_s") and k not in ("sync_s", "all_s")},
                       **{f"object_store {k}": v for k, v in r["object_store"].items()
                          if k.endswith("_s") and k not in ("sync_s", "all_s")},
                       "raw bytes put+get s": r["limits"]["object_store_bytes_put_get_s"]})
    _env.print_table(detail, title="\nwhat each side reports (medians, seconds)")
    key = {r["model"]: {"MB": round(r["bytes"] / 1e6, 2),
                        "collective_s": round(r["collective"]["sync_s"], 4),
                        "object_store_s": round(r["object_store"]["sync_s"], 4)} for r in results}
    _env.save_results(args.name, {"args": vars(args), "threads": threads, "load": quiet, "loadavg_end": _env.loadavg(),
                                  "models": results, "table": rows}, key)


if __name__ == "__main__":
    main()
