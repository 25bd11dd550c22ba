"""Training engines side by side: DeepSpeed ZeRO-2 vs FSDP2 (learner.zero_stage 2) update time on
CPU, the same model, batch and optimiser, 2 gloo ranks each.

What it measures, per backend (``learner.backend``), in two freshly spawned rank processes that
join their group as the learner does (rank 0 serves the rendezvous, both call the backend's
``join_group``, 1 torch thread each):
  * seconds per update: one optimiser step of the learner's actor-critic (value head detached)
    on ``--batch`` sequences of ``--tokens`` tokens, half per rank in ``--micro`` micro-batches
    (forward, backward through the engine, ``engine.step()``: gradient reduction, clipping at
    1.0, AdamW), timed on rank 0 from a barrier to the step's return; the median over
    ``--steps`` after ``--warmup`` steps. Backends alternate for ``--rounds`` rounds, so a load
    change on this shared machine hits both.
  * peak RSS per rank (whole process: Python, torch and transformers included) and the RSS just
    before the engine is built, so the difference is roughly the engine's.
  * the largest weight difference between the backends after the same steps (float32: both must
    make the same update; a sanity check, not a timing).
What it leaves out: ZeRO-3 / reshard-after-forward (``--zero-stage 3``), bf16 (``--dtype
bfloat16``; slow on CPU), GPUs, weight sync and checkpoints.

Run (repository root, ~2 minutes on 2 cores):
    .venv/bin/python -m benchmarks.train_engines
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchmarks import _env

BACKENDS = ("deepspeed", "fsdp2")
WORLD = 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rank(rank: int, backend: str, model_path: str, args: dict, out_dir: str) -> None:
    """One rank: join, build, warm up, time the steps; rank 0 writes result.json and both write
    their RSS; rank 0 also saves the final weights for the cross-backend check."""
    import torch.distributed as dist

    from rlhf_ray.backends.engine import EngineSettings, gather_full_state_dict, train_backend
    from rlhf_ray.config import LearnerConfig
    from rlhf_ray.models import ActorCritic
    from rlhf_ray.weight_sync.transport import serve_rendezvous

    torch.set_num_threads(1)
    out = Path(out_dir)
    if rank == 0:
        _, port, store = serve_rendezvous("127.0.0.1", 120.0)  # noqa: F841 (kept up while the group lives)
        (out / "port.tmp").write_text(str(port))
        os.replace(out / "port.tmp", out / "port")
    else:
        while not (out / "port").exists():
            time.sleep(0.05)
        port = int((out / "port").read_text())
    backend_module = train_backend(backend)
    backend_module.join_group("127.0.0.1", port, rank, WORLD, 120.0)

    batch, tokens, micro = args["batch"], args["tokens"], args["micro"]
    lrn = LearnerConfig(backend=backend, num_ranks=WORLD, zero_stage=args["zero_stage"],
                        micro_batch_size=batch // WORLD // micro, lr=1e-4, max_grad_norm=1.0)
    dtype = args["dtype"]

    def load():
        model = ActorCritic.from_pretrained(model_path, torch_dtype=getattr(torch, dtype))
        model.detach_value_head()
        return model

    rss_before = _rss_mb()
    engine = backend_module.build(load, EngineSettings(learner=lrn, dtype=dtype, grad_accum_steps=micro,
                                                       total_steps=args["warmup"] + args["steps"]))
    vocab = engine.module.policy.config.vocab_size
    response = tokens // 2

    def update(step: int) -> float:
        ids = torch.randint(4, vocab, (batch, tokens), generator=torch.Generator().manual_seed(step))
        parts = ids.chunk(WORLD)[rank].chunk(micro)
        dist.barrier()
        t0 = time.perf_counter()
        for i, mb in enumerate(parts):
            logits = engine(mb, torch.ones_like(mb), response_len=response).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            loss = -logp.gather(-1, mb[:, -response:, None]).sum() / (batch * response)
            engine.backward(loss, last=i == len(parts) - 1)
        outcome = engine.step()
        seconds = time.perf_counter() - t0
        assert outcome.applied
        return seconds

    engine.train()
    for step in range(args["warmup"]):
        update(step)
    times = [update(args["warmup"] + step) for step in range(args["steps"])]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    weights = gather_full_state_dict(engine, engine.module.named_parameters(), keep=rank == 0)
    (out / f"rss{rank}.json").write_text(json.dumps({"rss_before_build_mb": rss_before, "peak_rss_mb": peak}))
    if rank == 0:
        params = sum(v.numel() for v in weights.values())
        (out / "result.json").write_text(json.dumps({"step_s": times, "parameters": params}))
        torch.save(weights, out / "weights.pt")
    dist.barrier()


def run(backend: str, model_path: str, args: argparse.Namespace, out: Path) -> dict:
    out.mkdir(parents=True)
    ctx = mp.start_processes(_rank, args=(backend, model_path, vars(args), str(out)), nprocs=WORLD,
                             start_method="spawn", join=False)
    while not ctx.join(timeout=5):
        pass
    result = json.loads((out / "result.json").read_text())
    result["rss"] = [json.loads((out / f"rss{r}.json").read_text()) for r in range(WORLD)]
    result["weights_file"] = str(out / "weights.pt")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-hidden", type=int, default=256)
    ap.add_argument("--model-layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="sequences per update, over both ranks")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence (the last half scored)")
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per rank and update")
    ap.add_argument("--zero-stage", type=int, default=2, choices=(2, 3))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the backends")
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--name", default="train_engines")
    args = ap.parse_args()
    if args.batch % (WORLD * args.micro):
        ap.error(f"--batch {args.batch} must split into {WORLD} ranks x {args.micro} micro-batches; "
                 f"use a multiple of {WORLD * args.micro}")

    import tempfile

    threads = _env.set_threads(1)
    quiet = _env.wait_for_quiet(args.quiet_wait)
    model = _env.tiny_model(f"llama-h{args.model_hidden}-l{args.model_layers}", hidden_size=args.model_hidden,
                            num_layers=args.model_layers)
    scratch = Path(tempfile.mkdtemp(prefix="train-engines-"))
    runs: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    wall0 = time.perf_counter()
    for r in range(args.rounds):
        for backend in BACKENDS:
            runs[backend].append(run(backend, model, args, scratch / f"{backend}-{r}"))
    wall = time.perf_counter() - wall0

    final = {b: torch.load(runs[b][-1]["weights_file"]) for b in BACKENDS}
    max_diff = max(float((final["fsdp2"][k] - final["deepspeed"][k]).abs().max()) for k in final["deepspeed"])
    rows, key = [], {}
    for backend in BACKENDS:
        times = [t for run_ in runs[backend] for t in run_["step_s"]]
        peak = max(rank["peak_rss_mb"] for run_ in runs[backend] for rank in run_["rss"])
        before = max(rank["rss_before_build_mb"] for run_ in runs[backend] for rank in run_["rss"])
        rows.append({"backend": backend, "params": runs[backend][0]["parameters"], "s/update": _env.median(times),
                     "min s": min(times), "per-round medians": " ".join(f"{_env.median(x['step_s']):.4f}"
                                                                     for x in runs[backend]),
                     "peak RSS MB": peak, "RSS before build MB": before})
        key[f"{backend}_s_per_update"] = round(_env.median(times), 4)
        key[f"{backend}_peak_rss_mb"] = round(peak, 1)
    key["fsdp2_over_deepspeed"] = round(key["fsdp2_s_per_update"] / key["deepspeed_s_per_update"], 3)
    key["max_weight_diff"] = max_diff
    _env.print_table(rows, title=f"\nupdate time, 2 ranks x 1 thread, zero_stage {args.zero_stage}, {args.dtype}, "
                                 f"{args.batch} x {args.tokens} tokens per update in {args.micro} micro-batches per "
                                 f"rank; medians of {args.rounds} x {args.steps} steps")
    print(f"largest weight difference between the backends after the same steps: {max_diff:.2e}")
    for b in BACKENDS:
        for run_ in runs[b]:
            run_.pop("weights_file")
    _env.save_results(args.name, {"args": vars(args), "threads": threads, "load": quiet, "loadavg_end": _env.loadavg(),
                                  "wall_s": wall, "runs": runs, "table": rows}, key)


if __name__ == "__main__":
    main()
