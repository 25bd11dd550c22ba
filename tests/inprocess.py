"""In-process learner harness: one ``Learner`` rank (world size 1), no Ray.

Shared by ``tests/unit/test_learner_inprocess.py`` (CPU, gloo) and ``tests/gpu/test_learner_gpu.py``
(CUDA, NCCL). It builds a tiny-model config from dotted overrides, sets a learner up in this
process, makes a deterministic synthetic experience batch, and measures the quantities the tests
assert on (logprob gap to a plain transformers forward, the sync export, weights before/after).
Tolerances stay in the test files, next to their reasons.

Nothing here imports Ray, vLLM or (at module level) DeepSpeed, so GPU tests collect without them.
A second ``Learner.setup`` in the same process reuses the default process group that the first
one initialised; DeepSpeed engines can be built several times in one process.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from rlhf_ray.batch import ExperienceBatch, Generation, TrainUpdate, pack_generation
from rlhf_ray.config import Config, load_config

PAD_ID = 0  # the tiny tokenizer's <pad>; real tokens are drawn from [4, vocab)


def learner_config(model_path: str | Path, *, zero_stage: int = 2, dtype: str = "float32",
                   separate_critic: bool = False, offload_optimizer: bool = False, batch_size: int = 8,
                   mini_batches: int = 2, micro_batch_size: int = 2, forward_batch_size: int = 3,
                   response_len: int = 6, **overrides: object) -> Config:
    """A validated one-rank config for the tiny model. ``batch_size`` sequences make one
    iteration; each optimiser step takes batch_size / mini_batches of them in micro-batches of
    ``micro_batch_size``. ``forward_batch_size`` 3 (not a divisor of 8) makes ``compute_old``
    see a ragged last chunk. lr 1e-3 so one Adam step visibly moves bf16 weights too (a bf16
    ulp at 0.02 is ~1e-4). ``overrides``: more dotted keys, e.g. ``**{"ppo.epochs": 2}``."""
    base: dict[str, object] = {
        "model.path": str(model_path), "model.build_tiny": None, "model.dtype": dtype,
        "model.separate_critic": separate_critic,
        "model.value_head_init_std": 0.02,  # non-zero values, so the value check means something
        "learner.num_ranks": 1, "learner.zero_stage": zero_stage, "learner.offload_optimizer": offload_optimizer,
        "learner.micro_batch_size": micro_batch_size, "learner.forward_batch_size": forward_batch_size,
        "learner.lr": 1e-3,
        "rollout.prompts_per_iteration": batch_size, "rollout.samples_per_prompt": 1,
        "rollout.max_new_tokens": response_len, "ppo.mini_batches": mini_batches, "ppo.epochs": 1,
        "ppo.iterations": 10, "resources.learner.threads": 1, "logging.tensorboard": False,
        "logging.progress_bar": False, "eval.every": 0,
    }
    base.update(overrides)
    return load_config(None, base)


def build_learner(cfg: Config):
    """A set-up ``Learner`` (rank 0 of 1) and what ``setup`` returned. The address is loopback
    and the port free; a process that already has a default group ignores both."""
    from rlhf_ray.weight_sync.transport import free_port
    from rlhf_ray.workers.learner import Learner, LearnerSpec

    learner = Learner(LearnerSpec.from_config(cfg), rank=0)
    info = learner.setup("127.0.0.1", free_port())
    return learner, info


def release(learner) -> None:
    """Drop a learner's engine and optimiser so the next case starts from free memory."""
    for name in ("engine", "optimizer", "scheduler", "sync_params", "head"):
        if hasattr(learner, name):
            setattr(learner, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the batch


def synthetic_batch(B: int = 8, P: int = 7, R: int = 6, vocab: int = 512, seed: int = 0) -> ExperienceBatch:
    """A deterministic packed batch with every field ``Learner.train`` reads.

    Built the way the coordinator builds one: a ``Generation`` packed by ``pack_generation``.
    Prompts take 2..P tokens (left padding differs per row); responses cycle through lengths
    R, 1, R-2, R, 2, ... so the batch holds full-length rows (truncated) and short ones (EOS),
    and every micro-batch is trimmed differently. Old logprobs, old values, advantages and
    returns are seeded noise at response positions and exactly 0 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    cycle = [R, 1, max(1, R - 2), R, 2, max(1, R - 1)]
    prompts, responses = [], []
    for i in range(B):
        p_len = int(torch.randint(2, P + 1, (1,), generator=g))
        r_len = cycle[i % len(cycle)]
        prompts.append(torch.randint(4, vocab, (p_len,), generator=g).tolist())
        responses.append(torch.randint(4, vocab, (r_len,), generator=g).tolist())
    gen = Generation(prompt_ids=prompts, response_ids=responses,
                     logprobs=[[-3.0] * len(r) for r in responses],
                     finish_reasons=["length" if len(r) == R else "stop" for r in responses],
                     prompt_index=list(range(B)))
    batch = pack_generation(gen, pad_id=PAD_ID)
    mask = batch.response_mask
    noise = lambda scale: torch.randn(mask.shape, generator=g) * scale * mask  # noqa: E731
    return batch.replace(old_logprobs=(-3.0 + noise(0.1)) * mask, old_values=noise(0.1),
                         advantages=noise(1.0), returns=noise(1.0), ref_logprobs=(-3.0 + noise(0.1)) * mask)


def train(learner, batch: ExperienceBatch, iteration: int) -> dict[str, float]:
    """One update on ``batch`` as the coordinator drives it: ``compute_old`` (the rank keeps its
    slice with its own old logprobs and values), then ``train`` with only ``batch``'s advantages,
    returns and mask."""
    learner.compute_old(batch)
    return learner.train(TrainUpdate.of(batch), iteration)


def with_learner_old(learner, batch: ExperienceBatch) -> ExperienceBatch:
    """``batch`` with the learner's own old logprobs and values, as the coordinator fills them
    in: the first mini-batch of ``train`` is then exactly on-policy (ratio 1)."""
    old_lp, old_v = learner.compute_old(batch)
    return batch.replace(old_logprobs=old_lp, old_values=old_v)


# --------------------------------------------------------------------------- reading the learner


def _value_head(learner) -> torch.nn.Module:
    """The learner's value head module, held beside the engine (``learner.head``, a replicated
    float32 module; ``rlhf_ray.backends.replicated``)."""
    return learner.head.module


def value_head_state(learner) -> dict[str, torch.Tensor]:
    """The value head's parameters (CPU copies, own dtype): whole on every rank, outside the engine."""
    return {name: p.data.detach().clone().cpu() for name, p in _value_head(learner).named_parameters()}


def value_head_dtypes(learner) -> dict[str, torch.dtype]:
    """dtype of each value-head parameter as stored."""
    return {name: p.dtype for name, p in _value_head(learner).named_parameters()}


def sync_export(learner, bucket_bytes: int) -> tuple[list, dict[str, torch.Tensor]]:
    """The weight-sync view: ``(buckets, {name: tensor})`` from ``WeightSender.full_buckets`` over
    ``plan_buckets(weight_specs(), bucket_bytes)``, copied to CPU while each bucket is gathered."""
    from rlhf_ray.weight_sync.plan import plan_buckets

    buckets = plan_buckets(learner.weight_specs(), bucket_bytes)
    out: dict[str, torch.Tensor] = {}
    # enumerate the generator itself (not zip with buckets) so it runs to its end and leaves
    # the last ZeRO-3 gather context.
    for i, tensors in enumerate(learner.sender.full_buckets(buckets)):
        specs = buckets[i].specs
        assert len(specs) == len(tensors), (len(specs), len(tensors))
        for spec, t in zip(specs, tensors):
            out[spec.name] = t.detach().clone().cpu()
    return buckets, out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over tensors of the same names (in float32); the key sets must match."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def mean_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Mean |a - b| over every element of every tensor (float64 sums); key sets must match."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    total = sum(float((a[k].double() - b[k].double()).abs().sum()) for k in a)
    return total / sum(a[k].numel() for k in a)


# --------------------------------------------------------------------------- plain transformers


def hf_state_dict(model_path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under HF names, as a plain ``from_pretrained`` loads them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def plain_forward(model_path: str | Path, policy: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                  batch: ExperienceBatch, temperature: float, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (logprobs, values), each (B, R) float32 and 0 at padding, from a plain
    ``AutoModelForCausalLM`` holding ``policy`` weights (HF names) in ``dtype``, and the value
    head ``head`` (``linear.weight``/``linear.bias``) on its body's final hidden states.

    The whole batch in one forward, untrimmed, logits over all positions: none of the learner's
    shortcuts (micro-batches, trimming, response-only LM head) is shared with it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in policy.items()}, strict=True)
    model.to(device).eval()
    b = batch.to(device)
    P = b.prompt_len
    body = model.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask.long(),
                               position_ids=b.position_ids, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(body).float()[:, P - 1: -1] / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, b.response_ids.unsqueeze(-1)).squeeze(-1)
    w, bias = head["linear.weight"].to(device).float(), head["linear.bias"].to(device).float()
    values = (body.float()[:, P - 1: -1] @ w.T).squeeze(-1) + bias
    mask = b.response_mask
    return (logprobs * mask).cpu(), (values * mask).cpu()


def replay_after_load(learner, batch: ExperienceBatch, ckpt_dir: str, saved: dict[str, torch.Tensor],
                      saved_head: dict[str, torch.Tensor], iteration: int) -> tuple[dict, dict]:
    """Train one more update (the target), load ``ckpt_dir`` (which holds ``saved`` weights and
    ``saved_head``) and check both came back exactly, then train the same update again. Returns
    (target, replayed) policy state dicts: equal when the optimiser and schedule came back too."""
    train(learner, batch, iteration=iteration)
    target = learner.policy_state_dict()
    assert max_abs_diff(saved, target) > 0, "the update after the checkpoint changed nothing"
    assert learner.load_checkpoint(ckpt_dir)
    assert max_abs_diff(saved, learner.policy_state_dict()) == 0
    assert max_abs_diff(saved_head, value_head_state(learner)) == 0
    train(learner, batch, iteration=iteration)
    return target, learner.policy_state_dict()


# --------------------------------------------------------------------------- attention kernels


def register_test_attentions() -> tuple[str, str]:
    """Two attention kernels for transformers, standing in on the CPU for a flash kernel (which
    takes no mask and keeps packed sequences apart only through varlen boundaries); returns
    their names. "varlen_emulated" honours ``cu_seq_lens_q`` when given (flash's varlen path)
    and is plainly causal per row otherwise (flash's dense path); "rowwise_causal" always
    attends causally over the whole row, i.e. across packed sequences."""
    import torch.nn.functional as F
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from transformers.modeling_utils import AttentionInterface

    def attend(module, q, k, v, attention_mask, dropout=0.0, scaling=None, is_causal=None, varlen=True, **kw):
        B, H, T, D = q.shape  # k, v: (B, H_kv, T, D)
        k, v = (x.repeat_interleave(H // x.shape[1], 1) for x in (k, v))
        cu = kw.get("cu_seq_lens_q") if varlen else None
        if cu is None:
            allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            if attention_mask is not None:  # flash's padded path: (B, T) 1 = real key
                allowed = allowed & attention_mask.bool()[:, None, None, :]
                allowed = allowed | torch.eye(T, dtype=torch.bool, device=q.device)  # padding queries: no NaN
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling).transpose(1, 2), None
        flat = [x.transpose(1, 2).reshape(B * T, H, D) for x in (q, k, v)]
        out = torch.empty_like(flat[0])
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qs, ks, vs = (x[s:e].transpose(0, 1) for x in flat)
            out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1)
        return out.view(B, T, H, D), None

    names = ("varlen_emulated", "rowwise_causal")
    AttentionInterface.register(names[0], attend)
    AttentionInterface.register(names[1], lambda *a, **kw: attend(*a, varlen=False, **kw))
    for name in names:
        AttentionMaskInterface.register(name, flash_attention_mask)
    return names
