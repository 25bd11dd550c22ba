"""The PPO learner's update on one device, in-process: our DeepSpeed Learner vs plain torch.

What it measures: seconds per PPO update (``Learner.train`` on one rank, world size 1) for
random-init Llama-shaped models, under ZeRO-2 and ZeRO-3, next to a plain-torch reference doing
the same work. The learner is configured like one rank of configs/gpu_8x.yaml (read at run time;
today bf16, 4 mini-batches per update, micro-batches by a 16384-token budget with packed rows,
gradient checkpointing left to the learner, 1 epoch), with num_ranks 1; the batch is B sequences
of exactly P prompt + R response tokens (no padding). Per case: median seconds of
``--repeats`` timed updates after one warm-up; GPU time of forward / backward / optimiser step
(CUDA events around the engine's calls; "other" is the loss math, host work and gaps); trained
tokens per second (B x (P+R) x epochs); MFU = 6 x parameters x trained tokens / (seconds x
bf16 dense peak), parameters counting embeddings and the LM head (the 6N convention, no credit
for recomputation under gradient checkpointing); peak memory (torch.cuda.max_memory_allocated;
on CPU the process's peak RSS); and the GPU idle fraction of one more, profiled update (1 -
union of kernel/memcpy time / span from first to last kernel; profiler overhead inflates it).

The plain-torch reference: the same ``ActorCritic`` from the same checkpoint, fp32 master
weights on the device, bf16 autocast for the forward (when model.dtype is bfloat16), the same
losses from ``rlhf_ray.algorithms``, the same shuffle, mini-batches, micro-batches, gradient
accumulation, clip and LR schedule, ``torch.optim.AdamW(fused=True)`` on CUDA. Two differences,
both reported per row: it keeps rows apart where the learner packs each micro-batch into one row
(learner.packing; this batch has no padding, so only the attention masking differs:
``--set learner.packing=false`` compares like for like), and it uses gradient checkpointing only
when model.gradient_checkpointing is true, while the learner decides itself when it is unset
(``--set model.gradient_checkpointing=true`` or ``=false`` sets both).

Sizes (untied embeddings, full multi-head attention, vocab 32000 for the two real ones):
tiny 196,928 parameters (hidden 64, 2 layers); 0.5b 468,239,360 (hidden 1024, 24 layers, 16
heads, MLP 4096); 1.5b 1,518,687,744 (hidden 1536, 28 layers, 12 heads, MLP 8960); the value head
adds hidden + 1. Each case runs in its own process (clean peak memory; one crash or OOM does not
end the run). Peak bf16 FLOP/s: H100 SXM / H200 989e12, H100 PCIe 756e12, H100 NVL 835e12, A100
312e12; on another device (or CPU) MFU is left out.

What it leaves out: several ranks (one device), the old-logprob pass (``compute_old``), weight
sync, and any model loading time beyond the reported set-up seconds.

Run (repository root):
    python -m benchmarks.learner_gpu --device cuda                    # 0.5b, 1.5b; ZeRO-2, ZeRO-3, torch
    python -m benchmarks.learner_gpu --device cuda --sizes 0.5b --stages 3,torch --set learner.micro_batch_size=8
    python -m benchmarks.learner_gpu --device cpu --sizes tiny --batch 8 --prompt-len 16 --response-len 16 \\
        --repeats 2 --out /tmp/learner_cpu.json                          # CPU smoke run, ~30 s
Results: benchmarks/results/learner_gpu.json (+ a line in history.jsonl), or only ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import _env

GPU_CONFIG = _env.ROOT / "configs" / "gpu_8x.yaml"
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, vocab_size=512),
    "0.5b": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 vocab_size=32000),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, intermediate_size=8960,
                 vocab_size=32000),
}
# dense bf16 tensor-core peaks from the datasheets; checked in order against the device name
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
PHASES = ("forward", "backward", "step")


def peak_flops(device_name: str | None) -> float | None:
    for key, flops in PEAK_BF16:
        if device_name and key in device_name:
            return flops
    return None


# --------------------------------------------------------------------------- model, batch, config


def ensure_model(size: str, root: Path, device: str) -> tuple[Path, float]:
    """A random-init Llama of ``size`` saved (bf16) under root/size; built once. Returns (path,
    seconds spent building, 0 when it was there)."""
    out = root / size
    spec = {"size": size, "version": 1, **SIZES[size]}
    spec_file = out / "bench_spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return out, 0.0
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    shape = SIZES[size]
    heads = shape["num_attention_heads"]
    config = LlamaConfig(**shape, num_key_value_heads=heads, head_dim=shape["hidden_size"] // heads,
                         max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-6,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.5B parameters on a GPU takes a second, on a CPU a minute
        model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(out))  # bf16 on disk: the learner's dtype, half the bytes
    spec_file.write_text(json.dumps(spec) + "\n")  # last: marks a complete build
    del model
    return out, time.perf_counter() - t0


def full_batch(B: int, P: int, R: int, vocab: int, seed: int = 0):
    """B rows of exactly P prompt + R response tokens, packed like a rollout, with PPO fields."""
    from rlhf_ray.batch import Generation, pack_generation

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, P + R), generator=g).tolist()
    gen = Generation([row[:P] for row in ids], [row[P:] for row in ids], [[-3.0] * R for _ in range(B)],
                     ["length"] * B, list(range(B)))
    batch = pack_generation(gen, pad_id=0)
    noise = lambda: torch.randn(B, R, generator=g)  # noqa: E731
    return batch.replace(old_logprobs=-3.0 + 0.1 * noise(), old_values=0.1 * noise(), advantages=noise(),
                         returns=noise())


def bench_config(model_path: Path, stage: int, B: int, P: int, R: int, sets: dict[str, str]):
    """configs/gpu_8x.yaml as one learner rank over a B-sequence batch. Derived defaults (``--set``
    overrides them): when the yaml sizes micro-batches by sequences, micro-batch = min(its
    micro_batch_size, B / mini-batches) (a token budget, learner.micro_batch_tokens, is kept as
    it is); torch threads = min(the yaml's, CPUs this process may use)."""
    import yaml

    from rlhf_ray.config import load_config

    raw = yaml.safe_load(GPU_CONFIG.read_text())
    lrn = raw.get("learner", {})
    mini = int(sets.get("ppo.mini_batches", raw.get("ppo", {}).get("mini_batches", 1)))
    threads = int(raw.get("resources", {}).get("learner", {}).get("threads", 1))
    overrides: dict[str, Any] = {
        "model.path": str(model_path), "learner.num_ranks": 1, "learner.zero_stage": stage,
        "resources.learner.threads": min(threads, len(os.sched_getaffinity(0))),
        "rollout.prompts_per_iteration": B, "rollout.samples_per_prompt": 1, "data.max_prompt_tokens": P,
        "rollout.max_new_tokens": R, "rollout.max_model_len": P + R, "eval.every": 0,
        "logging.tensorboard": False, "logging.progress_bar": False,
    }
    if not int(sets.get("learner.micro_batch_tokens", lrn.get("micro_batch_tokens", 0))):
        overrides["learner.micro_batch_size"] = max(1, min(int(lrn.get("micro_batch_size", 4)), B // mini))
    overrides.update(sets)
    return load_config(str(GPU_CONFIG), overrides)


# --------------------------------------------------------------------------- timing


class PhaseClock:
    """Time of named phases within one update: CUDA events on the current stream (the GPU time from
    a phase's first launch to its last kernel, gaps included) or wall time on a CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: dict[str, list[tuple[Any, Any]]] = {}

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = self._now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.marks.setdefault(name, []).append((start, self._now()))
        return timed

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last call (waits for the GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
        span = (lambda s, e: s.elapsed_time(e) / 1e3) if self.cuda else (lambda s, e: e - s)
        out = {name: sum(span(s, e) for s, e in pairs) for name, pairs in self.marks.items()}
        self.marks = {}
        return out


class LearnerRunner:
    """Our learner: ``Learner.setup`` then ``Learner.train``; the engine's forward, backward and
    step calls are timed through instance-level wrappers (nothing in the learner changes)."""

    def __init__(self, cfg, clock: PhaseClock) -> None:
        from rlhf_ray.weight_sync.transport import free_port
        from rlhf_ray.workers.learner import Learner, LearnerSpec

        self.learner = Learner(LearnerSpec.from_config(cfg), 0)
        info = self.learner.setup("127.0.0.1", free_port())
        self.parameters = int(info["parameters"])
        # the learner decides itself when model.gradient_checkpointing is unset
        self.checkpointing = bool(info.get("gradient_checkpointing", cfg.model.gradient_checkpointing))
        engine = self.learner.engine
        for name in PHASES:
            setattr(engine, name, clock.wrap(name, getattr(engine, name)))
        self.precision = f"DeepSpeed {cfg.model.dtype} (bf16 parameters, fp32 master weights in the optimiser)" \
            if cfg.model.dtype == "bfloat16" else "DeepSpeed float32"

    def update(self, batch, iteration: int) -> None:
        from rlhf_ray.batch import TrainUpdate

        # The slice a rank keeps from compute_old, here with the batch's own old logprobs/values:
        # only the update is timed, as the module docstring says.
        self.learner.shard = batch
        self.learner.train(TrainUpdate.of(batch), iteration)


class TorchRunner:
    """The same update in plain torch (see the module docstring)."""

    def __init__(self, cfg, device: torch.device, clock: PhaseClock) -> None:
        from rlhf_ray.backends.engine import lr_scheduler
        from rlhf_ray.config import resolve
        from rlhf_ray.models import ActorCritic

        self.cfg, self.device, m, lrn = cfg, device, cfg.model, cfg.learner
        torch.set_num_threads(cfg.resources.learner.threads)
        torch.manual_seed(cfg.seed)
        self.model = ActorCritic.from_pretrained(
            m.path, value_head_init_std=m.value_head_init_std, value_grad_to_body=m.value_grad_to_body,
            separate_critic=m.separate_critic, critic_path=m.critic_path, torch_dtype=torch.float32).to(device)
        self.checkpointing = bool(m.gradient_checkpointing)  # unset: off (the learner may choose on)
        if self.checkpointing:
            self.model.policy.gradient_checkpointing_enable()
        self.model.train()
        self.parameters = sum(p.numel() for p in self.model.parameters())
        named = list(self.model.named_parameters())  # the learner's groups: the value head at value_head_lr
        groups = [{"params": [p for n, p in named if not n.startswith("value_head.")], "lr": lrn.lr},
                  {"params": [p for n, p in named if n.startswith("value_head.")],
                   "lr": lrn.value_head_lr or lrn.lr}]
        self.optimizer = torch.optim.AdamW(groups, lr=lrn.lr, betas=lrn.adam_betas, weight_decay=lrn.weight_decay,
                                           fused=device.type == "cuda")
        steps = cfg.ppo.iterations * resolve(cfg).optimizer_steps_per_iteration
        self.scheduler = lr_scheduler(self.optimizer, lrn, steps)
        self.bf16 = m.dtype == "bfloat16"
        self.forward = clock.wrap("forward", self.model)
        self.backward = clock.wrap("backward", lambda loss: loss.backward())
        self.step = clock.wrap("step", self._step)
        self.precision = "torch fp32 master weights + bf16 autocast" if self.bf16 else "torch float32"

    def _step(self) -> None:
        if self.cfg.learner.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.learner.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _micro_batches(self, mini) -> list[torch.Tensor]:
        """Row indices of each micro-batch, split as the learner splits one rank's mini-batch: by
        learner.micro_batch_tokens (fewest parts of similar token counts) or micro_batch_size."""
        from rlhf_ray.batch import plan_passes

        lrn = self.cfg.learner
        lengths = mini.attention_mask.sum(-1).tolist() if lrn.micro_batch_tokens > 0 else None
        plan = plan_passes(len(mini), max_rows=lrn.micro_batch_size, lengths=lengths, max_tokens=lrn.micro_batch_tokens)
        return [torch.tensor(rows) for rows in plan]

    def update(self, batch, iteration: int) -> None:
        from rlhf_ray.algorithms import logprobs_and_entropy
        from rlhf_ray.workers.objective import ppo_objective

        p, temperature = self.cfg.ppo, self.cfg.rollout.temperature
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + iteration * 31)  # the learner's rank-0 shuffle
        for _ in range(p.epochs):
            for mini in batch.select(torch.randperm(len(batch), generator=gen)).split(p.mini_batches):
                step_tokens = float(mini.num_response_tokens())
                step_sequences = float(mini.response_mask.any(-1).sum())
                for rows in self._micro_batches(mini):
                    mb = mini.select(rows).trim().to(self.device)
                    mask = mb.response_mask
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                        out = self.forward(mb.input_ids, mb.attention_mask.long(), mb.position_ids,
                                           response_len=mask.shape[1])
                    logprobs, entropy = logprobs_and_entropy(out.logits, mb.response_ids, temperature,
                                                             entropy_grad=p.entropy_coef > 0)
                    # The learner's own loss (policy, entropy and value terms as ppo.loss_agg says).
                    loss = ppo_objective(p, mb, logprobs, out.values.float(), entropy, step_tokens=step_tokens,
                                         step_sequences=step_sequences, kl_coef=p.kl_coef,
                                         max_len=self.cfg.rollout.max_new_tokens).loss
                    self.backward(loss)
                self.step()


def gpu_idle_fraction(update: Callable[[], None]) -> dict[str, Any]:
    """Run ``update`` under the CUDA profiler; 1 - (union of kernel, memcpy and memset time) / (span
    from the first kernel's start to the last one's end), from the exported Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        update()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        events = json.loads(Path(f"{d}/trace.json").read_text())["traceEvents"]
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    if not spans:
        return {"error": "the profiler recorded no kernels"}
    busy, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy, cur_start = busy + cur_end - cur_start, start
        cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    window = max(end for _, end in spans) - spans[0][0]
    return {"kernels": len(spans), "gpu_busy_s": busy / 1e6, "gpu_span_s": window / 1e6,
            "idle_fraction": 1.0 - busy / window if window > 0 else None}


# --------------------------------------------------------------------------- one case (child process)


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Build (if needed) the model, set one runner up, time its updates; a result row."""
    import resource

    cuda = spec["device"] == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    path, build_s = ensure_model(spec["size"], Path(spec["model_dir"]), device.type)
    stage = 2 if spec["case"] == "torch" else int(spec["case"].removeprefix("zero"))  # torch: unused
    B, P, R = spec["batch"], spec["prompt_len"], spec["response_len"]
    cfg = bench_config(path, stage, B, P, R, spec["sets"])
    batch = full_batch(B, P, R, SIZES[spec["size"]]["vocab_size"], cfg.seed)
    clock = PhaseClock(cuda)
    t0 = time.perf_counter()
    runner = TorchRunner(cfg, device, clock) if spec["case"] == "torch" else LearnerRunner(cfg, clock)
    setup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        after_setup = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    iteration = 0
    for _ in range(spec["warmup"]):
        runner.update(batch, iteration)
        iteration += 1
    clock.collect()
    seconds, phases = [], []
    for _ in range(spec["repeats"]):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        runner.update(batch, iteration)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
        phases.append(clock.collect())
        iteration += 1
    s = _env.median(seconds)
    tokens = B * (P + R) * cfg.ppo.epochs
    name = torch.cuda.get_device_name(0) if cuda else _env.snapshot()["cpu_model"]
    peak = peak_flops(name) if cuda else None
    row: dict[str, Any] = {
        "size": spec["size"], "case": spec["case"], "device": name, "parameters": runner.parameters,
        "precision": runner.precision, "batch": B, "prompt_len": P, "response_len": R, "trained_tokens": tokens,
        "mini_batches": cfg.ppo.mini_batches, "micro_batch": cfg.learner.micro_batch_size,
        "micro_batch_tokens": cfg.learner.micro_batch_tokens,
        "gradient_checkpointing": runner.checkpointing, "packing": cfg.learner.packing if spec["case"] != "torch"
        else False, "threads": cfg.resources.learner.threads,
        "build_s": build_s, "setup_s": setup_s, "seconds": seconds, "update_s": s,
        "phases_s": {k: _env.median([p.get(k, 0.0) for p in phases]) for k in PHASES},
        "tokens_per_s": tokens / s,
        "mfu": 6 * runner.parameters * tokens / (s * peak) if peak else None,
        "peak_flops": peak,
    }
    row["phases_s"]["other"] = s - sum(row["phases_s"].values())
    if cuda:
        row.update(peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, mem_after_setup_gib=after_setup / 2**30,
                   memory_kind="torch.cuda.max_memory_allocated")
        if spec["idle"]:
            try:
                row["gpu_idle"] = gpu_idle_fraction(lambda: runner.update(batch, iteration))
            except Exception as exc:  # the profiler is optional: keep the timings
                row["gpu_idle"] = {"error": f"{type(exc).__name__}: {exc}"}
            clock.collect()
    else:
        row.update(peak_mem_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                   memory_kind="peak RSS of the process (CPU)")
    return row


# --------------------------------------------------------------------------- driver


def _child_env(device: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if device == "cpu":  # also on a machine that has a GPU
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


def run_in_child(spec: dict[str, Any], timeout_s: float, verbose: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "row.json"
        cmd = [sys.executable, "-m", "benchmarks.learner_gpu", "--child", json.dumps(spec), "--child-out", str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=_env.ROOT, env=_child_env(spec["device"]), timeout=timeout_s,
                                  stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log, rc = proc.stdout or "", proc.returncode
        except subprocess.TimeoutExpired as exc:
            log, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), None
        wall = time.perf_counter() - t0
        if out.is_file():
            return {**json.loads(out.read_text()), "wall_s": wall}
    tail = "\n".join(log.strip().splitlines()[-25:])
    what = f"timed out after {timeout_s:.0f} s" if rc is None else f"exit code {rc}"
    print(f"--- {spec['size']} {spec['case']}: {what}\n{tail}\n---", flush=True)
    return {"size": spec["size"], "case": spec["case"], "error": what, "log_tail": tail, "wall_s": wall}


def _table_row(r: dict[str, Any]) -> dict[str, Any]:
    if "error" in r:
        return {"size": r["size"], "case": r["case"], "note": r["error"][:60]}
    ph, idle = r["phases_s"], (r.get("gpu_idle") or {}).get("idle_fraction")
    return {"size": r["size"], "case": r["case"], "params_M": r["parameters"] / 1e6, "s/update": r["update_s"],
            "fwd_s": ph["forward"], "bwd_s": ph["backward"], "step_s": ph["step"], "other_s": ph["other"],
            "tokens/s": r["tokens_per_s"], "MFU_%": 100 * r["mfu"] if r["mfu"] is not None else "n/a",
            "peak_GiB": r["peak_mem_gib"], "idle_%": 100 * idle if idle is not None else "n/a",
            "ckpt": "on" if r["gradient_checkpointing"] else "off",
            "setup_s": r["setup_s"], "note": ""}


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs key=value (e.g. learner.micro_batch_size=8), got {item!r}")
        out[key.removeprefix("--")] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--sizes", default="0.5b,1.5b", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--stages", default="2,3,torch", help="comma list of ZeRO stages 0-3 and/or torch")
    ap.add_argument("--batch", type=int, default=64, help="B sequences per update")
    ap.add_argument("--prompt-len", type=int, default=512, help="P prompt tokens per sequence")
    ap.add_argument("--response-len", type=int, default=512, help="R response tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3, help="timed updates per case (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    ap.add_argument("--no-idle", action="store_true", help="skip the profiled update (GPU idle fraction)")
    ap.add_argument("--model-dir", default=str(_env.MODEL_DIR / "learner_gpu"))
    ap.add_argument("--case-timeout", type=float, default=600.0, help="seconds one case may take")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="start no case after this many seconds (0: no limit)")
    ap.add_argument("--out", help="write the results JSON here only (not to benchmarks/results or history.jsonl)")
    ap.add_argument("--name", default="learner_gpu")
    ap.add_argument("--verbose", action="store_true", help="stream each case's output")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(run_case(json.loads(args.child))))
        return

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    cases = ["torch" if c.strip() == "torch" else f"zero{int(c)}" for c in args.stages.split(",") if c.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible; use --device cpu --sizes tiny for a smoke run")
    sets = parse_sets(args.set)
    t_start, rows = time.perf_counter(), []
    for size in sizes:
        for case in sorted(cases, key=lambda c: c != "torch"):  # the reference first
            left = args.time_budget - (time.perf_counter() - t_start) if args.time_budget else args.case_timeout
            if left < 30:
                rows.append({"size": size, "case": case, "error": "skipped: --time-budget spent"})
                continue
            spec = {"size": size, "case": case, "device": args.device, "batch": args.batch,
                    "prompt_len": args.prompt_len, "response_len": args.response_len, "repeats": args.repeats,
                    "warmup": args.warmup, "sets": sets, "model_dir": args.model_dir,
                    "idle": args.device == "cuda" and not args.no_idle}
            print(f"[learner_gpu] {size} {case} ...", flush=True)
            rows.append(run_in_child(spec, min(args.case_timeout, left), args.verbose))
    title = (f"\nPPO learner update, {args.device}, B={args.batch} x (P={args.prompt_len} + R={args.response_len}); "
             f"median of {args.repeats} after {args.warmup} warm-up")
    _env.print_table([_table_row(r) for r in rows], title=title)
    if any(r.get("mfu") is None and "error" not in r for r in rows):
        print("MFU n/a: no bf16 peak known for this device (CPU, or a GPU missing from PEAK_BF16)")
    payload = {"args": vars(args), "sizes": {s: SIZES[s] for s in sizes}, "rows": rows,
               "total_s": time.perf_counter() - t_start}
    key = {f"{r['size']}/{r['case']}_s": r.get("update_s") for r in rows}
    key.update({f"{r['size']}/{r['case']}_mfu": r.get("mfu") for r in rows if r.get("mfu") is not None})
    if args.out:
        doc = {"name": args.name, "env": _env.snapshot(), "key_numbers": key, **payload}
        Path(args.out).write_text(json.dumps(doc, indent=2, default=float) + "\n")
        print(f"saved {args.out}")
    else:
        _env.save_results(args.name, payload, key)


if __name__ == "__main__":
    main()
