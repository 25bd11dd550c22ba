"""LoRA vs full fine-tuning: learner memory (parameters + gradients + optimiser state) and weight-sync
bytes and seconds, on the demo model and a ~0.5B random-init Qwen2 (Qwen2.5-0.5B's shape).

What it measures:
  * memory, per model: the number of parameters (all, trainable) of the actor-critic with and
    without adapters (rank ``--rank`` on every projection), and the learner's bytes for them:
      - fp32 learner: 4 B per parameter + 4 B gradient + 8 B Adam moments per trainable parameter;
      - bf16 learner (DeepSpeed bf16): 2 B per parameter + 2 B gradient + 12 B fp32 master and Adam
        moments per trainable parameter (the ZeRO paper's 16 B per trained parameter).
    The fp32 accounting is checked against real allocations on the demo model: torch AdamW's
    state after one step, gradients and parameters, summed tensor by tensor ("measured").
    The 0.5B model is built on the meta device (no memory, no training): counts are exact.
  * sync, on the demo model and a 512 x 4 tiny Llama: what one weight sync moves (the tensors a
    learner sends: every policy tensor, or with LoRA the adapted layers merged) and its seconds in
    one process: learner side (merge + flatten into 16 MiB buckets, the object-store transport's
    arrays) and engine side (an in-process vLLM CPU engine's ``rlhf_load_arrays``, the receiver the
    rollout actors run, + prefix-cache reset). After each LoRA sync, the engine's logprobs of its
    own samples are compared with the merged HF model's (the run's logprob-mismatch check).
What it leaves out: Ray transport (same bytes, see benchmarks/weight_sync.py for GB/s), ZeRO-3
gathers, GPU engines. vLLM's own LoRA path (adapters loaded as a LoRARequest) is not measured.

Run (repository root, ~3 minutes on 2 busy cores):
    .venv/bin/python -m benchmarks.lora
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

import torch

from benchmarks import _env

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B), random init.
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)


def _spec(rank: int, targets: tuple[str, ...] = TARGETS):
    from rlhf_ray.models.lora import LoraSpec

    return LoraSpec(rank=rank, alpha=2.0 * rank, dropout=0.0, target_modules=targets)


def _counts(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def accounted(n_all: int, n_train: int) -> dict[str, int]:
    return {"fp32_bytes": 4 * n_all + 12 * n_train, "bf16_bytes": 2 * n_all + 14 * n_train}


def measured_fp32_bytes(model: torch.nn.Module) -> int:
    """Parameters + gradients + AdamW state after one step, summed over the real tensors."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    return params + grads + state


def sync_numel(model) -> int:
    """Elements one weight sync sends (the learner's plan: changed tensors only)."""
    from rlhf_ray.models.actor_critic import POLICY_PREFIX
    from rlhf_ray.models.export import export_plan

    plan = export_plan(model.policy, POLICY_PREFIX, changed_only=True)
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n, _ in plan.plain) + sum(m.base.numel() for m in plan.merged.values())


def actor_critic(path: str | None, rank: int, config=None, targets: tuple[str, ...] = TARGETS):
    """The learner's model: ActorCritic over ``path`` (or ``config`` built on the meta device)."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models import ActorCritic
    from rlhf_ray.models.lora import add_lora

    if path is not None:
        return ActorCritic.from_pretrained(path, lora=_spec(rank, targets) if rank else None)
    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(config)
        model = ActorCritic(policy)
        if rank:
            add_lora(model.policy, _spec(rank, targets))
    return model


def memory_rows(demo: str, rank: int) -> list[dict[str, Any]]:
    from transformers import Qwen2Config

    rows = []
    for name, path, config in (("demo tiny-llama", demo, None), ("qwen2 0.5B (random init)", None,
                                                                   Qwen2Config(**QWEN_05B))):
        for r, targets in ((0, TARGETS), (rank, TARGETS), (rank, ("q_proj", "v_proj"))):
            model = actor_critic(path, r, config, targets)
            n_all, n_train = _counts(model)
            mode = "full" if not r else f"lora r={r}" + (" q,v" if targets != TARGETS else "")
            row = {"model": name, "mode": mode, "parameters": n_all, "trainable": n_train,
                   **accounted(n_all, n_train), "sync_bf16_bytes": 2 * sync_numel(model)}
            if path is not None:
                row["fp32_measured_bytes"] = measured_fp32_bytes(model)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- sync


def start_engine(model_path: str):
    from vllm import LLM

    from rlhf_ray.backends.rollout import RolloutSpec
    from rlhf_ray.backends.vllm import _QuietBenignReload, engine_env, engine_kwargs

    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QuietBenignReload())
    spec = RolloutSpec.from_config(_env.bench_config(model_path))
    os.environ.update(engine_env(spec))  # in-process engine, 1 thread, as the rollout actor runs it
    return LLM(**engine_kwargs(spec, model_path, seed=0))


def _send_arrays(model, bucket_mb: float = 16.0):
    """What the learner's sync sends (changed tensors only), as (buckets, arrays)."""
    from rlhf_ray.models.actor_critic import POLICY_PREFIX
    from rlhf_ray.models.export import export_plan
    from rlhf_ray.weight_sync.plan import TensorSpec, dtype_name, plan_buckets
    from rlhf_ray.weight_sync.transport import to_array

    plan = export_plan(model.policy, POLICY_PREFIX, changed_only=True)
    params = dict(model.named_parameters())
    tensors = {hf: params[name].data for name, hf in plan.plain}
    tensors.update({hf: m.value() for hf, m in plan.merged.items()})
    specs = [TensorSpec(hf, tuple(t.shape), dtype_name(t.dtype)) for hf, t in tensors.items()]
    buckets = plan_buckets(specs, int(bucket_mb * 2**20))
    return buckets, [to_array([tensors[s.name] for s in b.specs]) for b in buckets]


@torch.no_grad()
def logprob_mismatch(llm, policy, prompts: list[list[int]]) -> float:
    """Mean |vLLM - HF| logprob of vLLM's own samples (temperature 1)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=8, temperature=1.0, logprobs=0, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    gaps = []
    for p, out in zip(prompts, outs):
        tokens = list(out.outputs[0].token_ids)
        ids = torch.tensor([p + tokens])
        logits = policy(input_ids=ids).logits[0, len(p) - 1: -1].float()
        hf = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        vl = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)])
        gaps.append((hf - vl).abs().mean())
    return float(torch.stack(gaps).mean())


def sync_rows(path: str, name: str, rank: int, reps: int) -> list[dict[str, Any]]:
    from rlhf_ray.weight_sync.plan import to_wire

    llm = start_engine(path)
    rows = []
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 500, (6,), generator=g).tolist() for _ in range(4)]
    for r in (rank, 0):  # LoRA first: its sync leaves the untouched tensors as the engine loaded them
        model = actor_critic(path, r)
        with torch.no_grad():  # an "update": moved adapters (B != 0), or every weight moved
            for n, p in model.policy.named_parameters():
                if p.requires_grad and (r == 0 or ".lora_B." in n):
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        prep, load = [], []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            buckets, arrays = _send_arrays(model)
            t1 = time.perf_counter()
            llm.collective_rpc("rlhf_load_arrays", args=(to_wire(buckets), arrays, r > 0))
            llm.reset_prefix_cache()
            prep.append(t1 - t0)
            load.append(time.perf_counter() - t1)
        rows.append({"model": name, "mode": f"lora r={r}" if r else "full",
                     "sync_bytes": sum(b.nbytes for b in buckets), "tensors": sum(len(b.specs) for b in buckets),
                     "learner_s": _env.median(prep[1:]), "engine_s": _env.median(load[1:]),
                     "sync_s": _env.median(prep[1:]) + _env.median(load[1:]),
                     "logprob_mismatch_mean": logprob_mismatch(llm, model.policy.eval(), prompts)})
    del llm
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = _env.set_threads(1)
    demo = _env.tiny_model()
    mid = _env.tiny_model("tiny-llama-512x4", hidden_size=512, num_layers=4)
    memory = memory_rows(demo, args.rank)
    _env.print_table(memory, title="learner memory: parameters + gradients + optimiser state")
    sync = sync_rows(demo, "demo tiny-llama", args.rank, args.repeats)
    sync += sync_rows(mid, "llama 512x4", args.rank, args.repeats)
    _env.print_table(sync, title="one weight sync (in-process engine, object-store arrays)")
    big = [r for r in memory if r["model"].startswith("qwen2")]
    key = {"qwen05b_bf16_full_gb": big[0]["bf16_bytes"] / 1e9, "qwen05b_bf16_lora_gb": big[1]["bf16_bytes"] / 1e9,
           "qwen05b_sync_mb_full": big[0]["sync_bf16_bytes"] / 2**20,
           "qwen05b_sync_mb_lora": big[1]["sync_bf16_bytes"] / 2**20,
           "demo_sync_bytes_full": sync[1]["sync_bytes"], "demo_sync_bytes_lora": sync[0]["sync_bytes"]}
    path = _env.save_results("lora", {"rank": args.rank, "targets": TARGETS, "threads": threads,
                                      "memory": memory, "sync": sync}, key)
    print(f"saved {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
