"""The memory plan (``rlhf_ray.backends.memory`` and ``memory_plan``): every term by hand on a small
made-up model, the parameter counts against real checkpoints, the refusal (dry run and a real
launch's pre-flight, before Ray), and the dry run's printout."""

from __future__ import annotations

import json
import sys

import pytest

from rlhf_ray.backends.memory import (CUDA_CONTEXT, CUDA_GRAPHS, GIB, ModelShape, engine_estimate, frozen_estimate,
                                      layer_activation_bytes, learner_estimate, logit_bytes, role_estimates)
from rlhf_ray.backends.memory_plan import MemoryPlanError, check_memory, gpu_size, memory_plan
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.launch import main

# H 8, I 16, 2 layers, 2 heads of 4 (q width 8), 1 KV head (kv width 4), V 32, untied.
# One block: q 8x8 + k, v 2 x 8x4 + o 8x8 + MLP 3 x 8x16 + 2 norms x 8 = 64 + 64 + 64 + 384 + 16 = 592.
# The model: embeddings 256 + 2 blocks 1184 + final norm 8 + LM head 256 = 1704.
SMALL = ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=32)
# LoRA rank 2 on all seven projections, r x (in + out): q 32, k 24, v 24, o 32, gate 48, up 48, down 48
# = 256 per block, 512 in all.
GPU = {"resources.learner.num_gpus": "1"}
# 4 prompts x 2 samples over 2 ranks, 1 mini-batch: 4 sequences of 4 + 4 tokens per rank and step.
SMALL_RUN = {"data.max_prompt_tokens": "4", "rollout.max_new_tokens": "4", "rollout.max_model_len": "16",
             "rollout.prompts_per_iteration": "4", "rollout.samples_per_prompt": "2", "learner.num_ranks": "2",
             "ppo.mini_batches": "1", "learner.logprob_chunk": "4", "learner.forward_batch_size": "16",
             "model.dtype": "bfloat16", **GPU}


def _cfg(**overrides: str):
    return load_config(None, {**SMALL_RUN, **{k.replace("__", "."): v for k, v in overrides.items()}})


def test_shape_counts():
    assert SMALL.block_params() == 592
    assert SMALL.params() == 1704
    assert SMALL.params(lm_head=False) == 1448
    assert SMALL.lora_params(2, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) == 512
    assert SMALL.lora_params(2, ("q_proj", "v_proj")) == 2 * (32 + 24)


def test_layer_activations_and_logits_by_hand():
    # per token and block, bf16: 8 H + 6 d H + 2 d kv + 4 d I = 64 + 96 + 16 + 128 = 304; final norm (4 + d) H = 48
    assert layer_activation_bytes(16, 8, 16, 2, kv_width=4) == 16 * (2 * 304 + 48)
    # checkpointing: every block's input d H (16 each) and one block recomputed
    assert layer_activation_bytes(16, 8, 16, 2, kv_width=4, checkpointing=True) == 16 * (2 * 16 + 304 + 48)
    # LoRA: frozen norms keep no output (- 2 d H = 32), B keeps A's output (7 modules x r 2 x d 2 = 28)
    assert layer_activation_bytes(16, 8, 16, 2, kv_width=4, trainable_norms=False, lora_rank=2,
                                  lora_modules=7) == 16 * (2 * (304 - 32 + 28) + 48)
    # float32: 8 H + 24 H + 8 kv + 16 I = 64 + 192 + 32 + 256 = 544; final norm 8 H = 64
    assert layer_activation_bytes(1, 8, 16, 2, kv_width=4, dtype_bytes=4) == 2 * 544 + 64
    # 8 scored x 32 vocab x 3 bf16 copies + 16 bytes x a chunk of 4 x 32
    assert logit_bytes(8, 32, 2, 4) == 1536 + 2048
    assert logit_bytes(2, 32, 2, 4) == 2 * 32 * 6 + 16 * 2 * 32  # a chunk larger than the positions


@pytest.mark.parametrize("dtype,lora", [("bfloat16", False), ("float32", False), ("bfloat16", True)])
def test_layer_activations_are_what_autograd_saves(dtype, lora):
    """The formula against the tensors a transformers Llama block really saves for its backward pass
    (distinct storages seen by ``saved_tensors_hooks``; 4 heads of 32, 2 KV heads, one causal row)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_ray.config.schema import LoraConfig
    from rlhf_ray.models.lora import LoraSpec, add_lora

    H, I, T, torch_dtype = 128, 256, 64, getattr(torch, dtype)

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                             attn_implementation="sdpa")).to(torch_dtype)
        if lora:
            add_lora(model, LoraSpec.of(LoraConfig(rank=2)))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=torch.arange(T).unsqueeze(0))
        return sum(n for ptr, n in kept.items() if ptr not in params)

    d = 2 if dtype == "bfloat16" else 4
    shape = dict(kv_width=64, dtype_bytes=d, trainable_norms=not lora, lora_rank=2 if lora else 0,
                 lora_modules=7 if lora else 0)
    per_block = layer_activation_bytes(T, H, I, 2, **shape) - layer_activation_bytes(T, H, I, 1, **shape)
    # left out of the formula: each norm's float32 rsqrt and the attention's logsumexp (24 bytes a token here)
    assert (saved(3) - saved(1)) / 2 == pytest.approx(per_block, rel=0.01)


# The learner counts grouped KV heads at q's width (transformers' sdpa repeats them under a mask):
# per token and block in bf16, 8 H + 4 d H + 2 d (q + kv) + 4 d I = 64 + 64 + 64 + 128 = 320.


def test_learner_zero2_two_micro_batches_by_hand():
    # micro_batch_size 2 of 4 sequences per step: 2 micro-batches of 16 tokens, 8 scored.
    est = learner_estimate(_cfg(learner__micro_batch_size="2", learner__zero_stage="2"), SMALL)
    assert est.terms == {
        "weights": 2 * 1704,  # bf16, whole on each rank
        "master weights": 4 * 1704 // 2,  # float32, partitioned over 2 ranks
        "optimizer states": 8 * 1704 // 2,  # AdamW m and v
        "gradients": 2 * 1704 // 2,  # the first micro-batch's, partitioned, held through the second
        "activations": 16 * (2 * 320 + 48),
        "logits": 1536 + 2048,
        "value head": 16 * 9 + 4 * 8 * 8,  # float32 H + 1 weights, gradient, m, v; its float32 input at 8 positions
        # two default buckets of 5e8 bf16 elements, beyond the logits' working set (3584 - 8 x 32 x 2)
        "reduce buckets": 2 * 500_000_000 * 2 - 3072,
        "CUDA context": CUDA_CONTEXT,
    }
    assert est.total == sum(est.terms.values()) and est.count == 2


def test_learner_zero3_lora_float32_by_hand():
    # one micro-batch of 4 sequences (32 tokens, 16 scored); LoRA: 512 adapters trainable of 2216
    cfg = _cfg(learner__micro_batch_size="4", learner__zero_stage="3", model__dtype="float32", model__lora__rank="2")
    est = learner_estimate(cfg, SMALL)
    assert est.terms == {
        "weights": 4 * 2216 // 2,  # float32, ZeRO-3 partitions
        "optimizer states": 8 * 512 // 2,  # adapters only; no master copy in float32
        "gradients": 4 * 512 // 2,  # ZeRO-3's partition, allocated at set-up
        "gathered parameters": 2 * 4 * 592,  # a block and the prefetched next one
        # per block 64 + 128 + 8 x 16 + 256 = 576, - 2 d H (64) + 7 x 2 x 4 (56) = 568; final norm 8 H
        "activations": 32 * (2 * 568 + 64),
        "logits": 16 * 32 * 12 + 16 * 4 * 32,
        "value head": 16 * 9 + 4 * 16 * 8,
        "CUDA context": CUDA_CONTEXT,  # ZeRO-3's buckets (2 H^2) hide under the logits' working set
    }


def test_learner_fsdp2_offload_checkpointing_by_hand():
    cfg = _cfg(learner__backend="fsdp2", learner__micro_batch_size="2", learner__offload_optimizer="true",
               model__gradient_checkpointing="true")
    est = learner_estimate(cfg, SMALL)
    assert est.terms == {
        "gathered parameters": 2 * 1704,  # zero_stage 2: every block gathered in bf16 from forward to backward
        "gradients": 4 * 1704,  # unsharded float32, accumulated over the 2 micro-batches without sync
        "activations": 16 * (2 * 16 + 320 + 48),
        "logits": 1536 + 2048,
        "value head": 16 * 9 + 4 * 8 * 8,
        "CUDA context": CUDA_CONTEXT,  # float32 shards and AdamW state live on the CPU
    }


def test_separate_critic_doubles_the_body():
    critic = SMALL
    one = learner_estimate(_cfg(learner__micro_batch_size="4", learner__zero_stage="3"), SMALL)
    two = learner_estimate(_cfg(learner__micro_batch_size="4", learner__zero_stage="3"), SMALL, critic)
    assert two.terms["weights"] - one.terms["weights"] == 2 * 1448 // 2  # the critic body has no LM head
    assert two.terms["activations"] == 2 * one.terms["activations"]
    assert two.terms["logits"] == one.terms["logits"]


def test_the_unset_checkpointing_follows_the_gpu_size():
    cfg = _cfg(learner__micro_batch_size="2")
    assert "off (auto, GPU size unknown" in learner_estimate(cfg, SMALL).notes["activations"]
    # the state before activations: 3408 + 3408 + 6816 + 1704 = 15336 bytes; activations and logits 14592
    big = learner_estimate(cfg, SMALL, gpu_bytes=80 * GIB)
    small = learner_estimate(cfg, SMALL, gpu_bytes=CUDA_CONTEXT + 15336 + 17000)  # 14592 > 0.8 x 17000 left
    assert "off (auto)" in big.notes["activations"] and "on (auto)" in small.notes["activations"]
    assert small.terms["activations"] == 16 * (2 * 16 + 320 + 48)


def test_engine_and_frozen_roles_by_hand():
    cfg = _cfg(rollout__vllm__gpu_memory_utilization="0.5", rollout__vllm__enforce_eager="false",
               reference__micro_batch_size="2", reward__micro_batch_size="2")
    est = engine_estimate(cfg, SMALL, gpu_bytes=4 * GIB)
    assert est.terms == {"weights": 3408, "KV cache and activations": 2 * GIB - 3408 - CUDA_CONTEXT,
                         "CUDA context": CUDA_CONTEXT, "CUDA graphs": CUDA_GRAPHS}
    # KV per token: K and V x 2 layers x 1 head x 4 x bf16 = 32 bytes; one 16-token sequence
    assert est.floor == 3408 + CUDA_CONTEXT + 32 * 16
    assert "KV cache and activations" not in engine_estimate(cfg, SMALL).terms  # GPU size unknown
    ref = frozen_estimate(cfg, "reference", SMALL)
    # 2 x 8 tokens x (d (2 H + 3 I) + 4 H) = 16 x 160; logits 2 x 4 x 32 x (2 + 8)
    assert ref.terms == {"weights": 3408, "activations": 2560, "logits": 2560, "CUDA context": CUDA_CONTEXT}
    rm = frozen_estimate(cfg, "reward", SMALL)
    assert rm.terms == {"weights": 2 * 1448, "activations": 2560, "CUDA context": CUDA_CONTEXT}
    assert frozen_estimate(cfg, "reward", None).terms == {"CUDA context": CUDA_CONTEXT}


def test_only_gpu_roles_are_planned():
    cpu = load_config("configs/demo_cpu.yaml", {})
    assert role_estimates(cpu, read=lambda path: SMALL) == [] and memory_plan(cpu) is None
    cfg = _cfg(resources__rollout__num_gpus="1", resources__reward__num_gpus="1")
    assert [e.role for e in role_estimates(cfg, read=lambda path: SMALL)] == ["rollout", "reward", "learner"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_parameter_counts_match_real_checkpoints(tmp_path, arch):
    from rlhf_ray.tiny_models import build_tiny_model, count_parameters

    lm = build_tiny_model(tmp_path / "lm", arch=arch)
    assert ModelShape.read(str(lm)).params() == count_parameters(lm)
    rm = build_tiny_model(tmp_path / "rm", arch=arch, kind="reward")
    shape = ModelShape.read(str(rm))
    assert shape.params(lm_head=False) + shape.hidden == count_parameters(rm)  # + the 1-label score head


def test_unreadable_model_config_says_which_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        ModelShape.read(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="lacks intermediate_size, num_hidden_layers, num_attention_heads, vocab_size"):
        ModelShape.read(str(tmp_path))


def test_gpu_size_from_the_option_the_machine_or_unknown():
    cfg = _cfg()
    assert gpu_size(load_config(None, {"resources.gpu_memory_gib": "80"})) == (80 * GIB, "--resources.gpu_memory_gib")
    assert gpu_size(cfg, detect=lambda: (5 * GIB, "NVIDIA H100")) == (5 * GIB, "NVIDIA H100 on the launcher's machine")
    assert gpu_size(cfg, detect=lambda: None)[0] is None
    with pytest.raises(ConfigError, match="--resources.gpu_memory_gib must be > 0"):
        load_config(None, {"resources.gpu_memory_gib": "0"})


# --------------------------------------------------------------------------- refusal and printout


@pytest.fixture()
def model_dir(tmp_path):
    """A ~1.2B-parameter Llama-shaped config.json (no weights: the plan reads only the config)."""
    path = tmp_path / "m1b"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "tie_word_embeddings": True}))
    return str(path)


def _too_big(model_dir: str) -> dict:
    """configs/gpu_8x.yaml's learner with gradient checkpointing off, on a 32 GiB GPU."""
    return {"model.path": model_dir, "reward.kind": "function", "model.gradient_checkpointing": "false",
            "resources.gpu_memory_gib": "32"}


def test_a_plan_that_cannot_fit_names_the_role_the_term_and_the_fix(model_dir):
    cfg = load_config("configs/gpu_8x.yaml", _too_big(model_dir))
    plan = memory_plan(cfg)
    learner = next(e for e in plan.estimates if e.role == "learner")
    assert learner.total > 32 * GIB and max(learner.terms, key=learner.terms.get) == "activations"
    error = plan.error()
    assert isinstance(error, MemoryPlanError)
    text = str(error)
    assert "the learner role (4 actor(s)): needs about" in text and "but has 32.0 GiB" in text
    assert "The term that breaks it is activations" in text
    assert "Each of these alone makes it fit: --model.gradient_checkpointing true" in text
    assert "rollout role" not in text  # the engines fit
    assert memory_plan(load_config("configs/gpu_8x.yaml", {**_too_big(model_dir),
                                                           "model.gradient_checkpointing": "true"})).error() is None


def test_dry_run_prints_the_plan_after_the_placement_plan(model_dir, capsys):
    argv = ["--config", "configs/gpu_8x.yaml", "--dry-run", "--model.path", model_dir, "--reward.model_path", model_dir,
            "--resources.gpu_memory_gib", "79"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    placement, memory = out.split("placement plan (one placement group per role):\n")[1].split("memory plan")
    assert placement.splitlines()[-1].startswith("  learner    x4")
    lines = ("memory plan" + memory).splitlines()
    assert lines[0] == "memory plan per GPU, GiB (GPU 79.0 GiB: --resources.gpu_memory_gib):"
    cfg = load_config("configs/gpu_8x.yaml", {"model.path": model_dir, "reward.model_path": model_dir,
                                              "resources.gpu_memory_gib": "79"})
    for est in memory_plan(cfg).estimates:
        assert f"  {est.role:<10} x{est.count}  {est.total / GIB:>6.1f}  fits in 79.0" in lines
        for name, value in est.terms.items():
            assert any(line.startswith(f"      {name:<26}{value / GIB:>6.1f}") for line in lines), (est.role, name)
    assert [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("    ")] == [
        "rollout", "reference", "reward", "learner"]


def test_dry_run_without_a_gpu_size_gives_no_verdict(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("rlhf_ray.backends.memory_plan.detect_gpu", lambda: None)
    assert main(["--config", "configs/gpu_8x.yaml", "--dry-run", "--model.path", model_dir, "--reward.kind",
                 "function", "--model.gradient_checkpointing", "false"]) == 0  # would not fit 32 GiB, but unknown
    out = capsys.readouterr().out
    assert "GPU size unknown: no GPU visible to the launcher: no verdict; set --resources.gpu_memory_gib" in out
    assert "fits" not in out and "DOES NOT FIT" not in out
    assert "the rest of 0.85 x GPU (GPU size unknown)" in out


def test_dry_run_refuses_a_plan_that_cannot_fit(model_dir, capsys):
    argv = ["--config", "configs/gpu_8x.yaml", "--dry-run"] + [a for k, v in _too_big(model_dir).items()
                                                               for a in ("--" + k, v)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "  learner    x4" in captured.out and "DOES NOT FIT in 32.0" in captured.out
    assert captured.err.startswith("error: memory plan: the learner role") and "activations" in captured.err


def test_a_real_launch_refuses_in_the_preflight_before_ray(model_dir, tmp_path, capsys, monkeypatch):
    import rlhf_ray.runtime.cluster as cluster

    started = []  # Ray may already run in this process (the integration tests' cluster): watch the call
    monkeypatch.setattr(cluster, "start_ray", lambda *a, **k: started.append(a) or pytest.fail("Ray was started"))
    run_dir = tmp_path / "run"
    argv = ["--config", "configs/gpu_8x.yaml", "--logging.run_dir", str(run_dir)] + [
        a for k, v in _too_big(model_dir).items() for a in ("--" + k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: memory plan: the learner role") and "--model.gradient_checkpointing true" in err
    assert not run_dir.exists()  # stopped before the run directory, Ray and the roles
    assert started == []


def test_a_model_the_plan_cannot_size_is_reported_not_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"n_embd": 64, "n_layer": 2}')  # GPT-2's names
    cfg = load_config("configs/gpu_8x.yaml", {"model.path": str(tmp_path), "resources.gpu_memory_gib": "80"})
    assert check_memory(cfg) is None
    assert "memory plan: not estimated: " in capsys.readouterr().out


def test_cpu_configs_print_nothing_new(capsys):
    assert main(["--config", "configs/demo_cpu.yaml", "--dry-run"]) == 0
    assert "memory plan" not in capsys.readouterr().out
