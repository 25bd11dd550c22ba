"""Peak GPU memory of each role, estimated from the config and the models' config.json alone.

No weights are loaded and nothing is imported beyond the standard library and the config tree:
the dry run and the pre-flight (``rlhf_ray.backends.memory_plan``) call it before Ray starts, and
the learner's automatic gradient checkpointing uses the same activation formula
(:func:`needs_activation_checkpointing`, re-exported by ``rlhf_ray.backends.engine``).

Every estimate is a :class:`RoleEstimate`: named terms (term -> bytes) whose sum is the role's
peak on one GPU. What each term counts is in its function's docstring. Sizes: ``N`` parameters,
``d`` bytes per value of the compute dtype (bf16 2, float32 4), ``w`` learner ranks, ``T`` tokens
of one pass, ``S`` of them scored (the positions that predict response tokens), ``H``/``I``/``L``/
``V`` hidden, MLP, layers, vocabulary.

Calibration (``tests/unit/test_memory_calibration.py``): the learner's terms, less the CUDA
context, against ``torch.cuda.max_memory_allocated`` of the H100 runs in
``benchmarks/results/learner_gpu*.json``. The engines' KV cache is vLLM's own sizing (the rest of
its memory fraction); the reference and reward working sets and the allowances for the CUDA
context and CUDA graphs are not measured yet.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from rlhf_ray.config import Config
from rlhf_ray.config.critic import reward_model_for_value
from rlhf_ray.config.episodes import episode_tokens
from rlhf_ray.config.validate import reference_from_learner

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 0}  # float32 state per trainable parameter (AdamW: m and v)
CUDA_CONTEXT = GIB // 2  # the driver's context and kernels: outside torch's allocator, so not in max_memory_allocated
CUDA_GRAPHS = GIB  # an allowance for vLLM's captured decode graphs (enforce_eager false); not measured here
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size (ZeRO-1/2)
DEEPSPEED_SUB_GROUP = 1_000_000_000  # elements: ZeRO-3 steps the optimiser one sub-group at a time
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """A decoder's sizes, as its config.json states them (Llama/Qwen2/Mistral-style blocks)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False  # tie_word_embeddings: the LM head is the embedding matrix
    qkv_bias: bool = False  # Qwen2 (and attention_bias true) add biases to q, k and v

    @staticmethod
    def read(path: str) -> "ModelShape":
        """The shape in ``path``/config.json (a multimodal config's ``text_config``). FileNotFoundError
        names the file; a config without the sizes raises ValueError naming the missing keys."""
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} does not exist: the memory plan reads each model's sizes from its "
                                    "config.json (no weights are loaded).")
        with open(file) as fh:
            raw = json.load(fh)
        text = raw.get("text_config") or raw
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if text.get(k) is None]
        if missing:
            raise ValueError(f"{file} lacks {', '.join(missing)}: the memory plan cannot size this model.")
        heads = int(text["num_attention_heads"])
        return ModelShape(
            hidden=int(text["hidden_size"]), intermediate=int(text["intermediate_size"]),
            layers=int(text["num_hidden_layers"]), heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads), vocab=int(text["vocab_size"]),
            tied=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            qkv_bias=bool(text.get("attention_bias")) or raw.get("model_type") == "qwen2")

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def block_params(self) -> int:
        """One decoder block: q, k, v, o, the gated MLP's three matrices, two norms (and q/k/v biases)."""
        H, q, kv = self.hidden, self.q_width, self.kv_width
        bias = q + 2 * kv if self.qkv_bias else 0
        return H * q + 2 * H * kv + q * H + 3 * H * self.intermediate + 2 * H + bias

    def params(self, lm_head: bool = True) -> int:
        """Embeddings, blocks, final norm, and the LM head when asked and untied (``lm_head=False``:
        a body, e.g. the separate critic's or a reward model's without its score head)."""
        head = self.vocab * self.hidden if lm_head and not self.tied else 0
        return self.vocab * self.hidden + self.layers * self.block_params() + self.hidden + head

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        """LoRA adapters of ``rank`` on the ``targets`` projections of every block: r x (in + out) each."""
        H, q, kv, mlp = self.hidden, self.q_width, self.kv_width, self.intermediate
        sides = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
                 "gate_proj": (H, mlp), "up_proj": (H, mlp), "down_proj": (mlp, H)}
        return self.layers * sum(rank * sum(sides[t]) for t in targets if t in sides)


# --------------------------------------------------------------------------- activations (one home)


def layer_activation_bytes(tokens: int, hidden: int, intermediate: int, layers: int, kv_width: int | None = None,
                           dtype_bytes: int = 2, checkpointing: bool = False, trainable_norms: bool = True,
                           lora_rank: int = 0, lora_modules: int = 0, q_width: int | None = None) -> int:
    """Bytes autograd keeps for the backward pass of ``tokens`` tokens through a Llama-style body.

    Per token and block, with a fused attention (sdpa/flash: no T x T matrix): each RMSNorm keeps
    the float32 copy of its input (4 H) and its normalised output (d H); the q/k/v input (d H); the
    attention's q, k, v and output (d (2 q + 2 kv), ``q_width`` and ``kv_width`` default H); the MLP
    input (d H); gate, SiLU(gate), up and their product (4 d I): ``8 H + 4 d H + 2 d (q + kv) + 4 d I``.
    Transformers' sdpa path repeats grouped KV heads to q's width whenever it passes a
    mask (packed or padded rows), so the learner counts kv = q, an upper bound (on the CPU a padded
    block with 4 heads and 1 KV head, H 128, I 256, saved 4888 bytes a token: 4736 at kv's width,
    5120 at q's). Frozen norm weights (LoRA) keep no
    normalised output (``- 2 d H``); LoRA's B keeps A's output (``r d`` per adapted module). Counted
    from the tensors autograd saves (``saved_tensors_hooks`` on a bf16 and a float32 Llama, CPU):
    24 H + 8 I bytes for bf16 full fine-tuning, 20 H + 8 I with LoRA, as written here. The count
    this replaces (8 H + 4 I values of 2 bytes, and 10 bytes per scored logit) missed the norms'
    float32 copies and part of the logits' working set: with the same model-state terms it put the
    four full fine-tuning H100 peaks of ``benchmarks/results/learner_gpu.json`` 9-14% low.

    ``checkpointing`` (gradient checkpointing per block): every block's input (d H) plus one block
    recomputed in the backward. The final norm adds (4 + d) H per token either way.
    """
    q = hidden if q_width is None else q_width
    kv = hidden if kv_width is None else kv_width
    d = dtype_bytes
    block = 8 * hidden + 4 * d * hidden + 2 * d * (q + kv) + 4 * d * intermediate + lora_modules * lora_rank * d
    if not trainable_norms:
        block -= 2 * d * hidden
    kept = layers * d * hidden + block if checkpointing else layers * block
    return tokens * (kept + (4 + d) * hidden)


def logit_bytes(scored: int, vocab: int, dtype_bytes: int = 2, chunk: int = 4096) -> int:
    """Bytes of the LM head's output in a training pass over ``scored`` positions, at the start of
    the backward pass (the learner's peak): the logits, their gradient and one chunk's full-size
    slice gradient before it is added (3 d per logit), and the float32 working copies of one
    ``learner.logprob_chunk`` chunk recomputed for the log-softmax (4 x 4 bytes per logit). The
    counts are measured: peak RSS of ``chunked_logprobs_and_entropy`` forward and backward on the
    CPU (8192 x 32000 logits, chunks of 1024-4096) gave 2.3-2.7 logit copies and 3.8-4.5 chunk copies."""
    return scored * vocab * 3 * dtype_bytes + 16 * min(chunk, scored) * vocab


def activation_bytes(tokens: int, response_tokens: int, hidden: int, intermediate: int, layers: int, vocab: int,
                     kv_width: int | None = None, dtype_bytes: int = 2, logprob_chunk: int = 4096,
                     checkpointing: bool = False) -> int:
    """Activations of one training micro-batch of ``tokens`` tokens, ``response_tokens`` of them
    scored: :func:`layer_activation_bytes` + :func:`logit_bytes`. E.g. 16 x 1024 tokens, half
    scored, H 1024, I 4096, 24 layers, V 32000, bf16: 16384 x (24 x 57344 + 6144) + 8192 x 32000
    x 6 + 16 x 4096 x 32000 = 22.65e9 + 1.57e9 + 2.10e9 = 26.3e9 bytes."""
    return (layer_activation_bytes(tokens, hidden, intermediate, layers, kv_width, dtype_bytes, checkpointing)
            + logit_bytes(response_tokens, vocab, dtype_bytes, logprob_chunk))


def needs_activation_checkpointing(tokens: int, response_tokens: int, hidden: int, intermediate: int,
                                   layers: int, vocab: int, free_bytes: int, headroom: float = 0.8) -> bool:
    """True when one micro-batch's activations (:func:`activation_bytes`, bf16) exceed ``headroom``
    of the device memory left once the model, its optimiser state and gradients are in place.
    Recomputing the forward costs ~1/3 more step time, so it is worth it only when needed."""
    need = activation_bytes(tokens, response_tokens, hidden, intermediate, layers, vocab)
    return need > headroom * free_bytes


def inference_bytes(tokens: int, shape: ModelShape, dtype_bytes: int) -> int:
    """Working memory of a no-grad forward of ``tokens`` tokens: the residual stream and the norm's
    output beside the MLP's gate, up and SiLU(gate) (d (2 H + 3 I) per token), plus the float32
    copy inside a norm (4 H). Not measured yet."""
    return tokens * (dtype_bytes * (2 * shape.hidden + 3 * shape.intermediate) + 4 * shape.hidden)


# --------------------------------------------------------------------------- estimates per role


@dataclass(frozen=True)
class RoleEstimate:
    """One actor's peak on one GPU: ``terms`` (name -> bytes, printed in this order) sum to it."""

    role: str  # the placement role: learner, rollout, reference or reward
    count: int  # actors of the role
    terms: dict[str, int]
    notes: dict[str, str] = field(default_factory=dict)  # name -> what the term counts here
    floor: int = 0  # rollout: what the engine must be left for one max_model_len sequence (0: no such limit)

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def _tokens(cfg: Config) -> tuple[int, int, int, int]:
    """(tokens of one learner micro-batch, its scored positions, micro-batches per optimiser step,
    tokens of one no-grad pass) at full-length prompts and responses."""
    lrn, r = cfg.learner, cfg.rollout
    response = episode_tokens(cfg)  # a multi-turn episode's turns and observations
    longest = cfg.data.max_prompt_tokens + response
    step_seqs = r.prompts_per_iteration * r.samples_per_prompt // (lrn.num_ranks * cfg.ppo.mini_batches)
    step_tokens = max(1, step_seqs) * longest
    tokens = min(lrn.micro_batch_tokens or lrn.micro_batch_size * longest, step_tokens)
    shard_tokens = step_tokens * cfg.ppo.mini_batches
    no_grad = min(lrn.forward_max_tokens or lrn.forward_batch_size * longest, shard_tokens)
    return tokens, tokens * response // longest, math.ceil(step_tokens / tokens), no_grad


def learner_estimate(cfg: Config, policy: ModelShape, critic: ModelShape | None = None,
                     gpu_bytes: int | None = None) -> RoleEstimate:
    """One learner rank. ``critic``: the separate critic's body (model.separate_critic).
    ``gpu_bytes`` decides model.gradient_checkpointing when it is unset, as the learner does."""
    m, lrn, p = cfg.model, cfg.learner, cfg.ppo
    d, w, stage = DTYPE_BYTES[m.dtype], lrn.num_ranks, lrn.zero_stage
    targets = tuple(t for t in m.lora.target_modules if t in LORA_MODULES)
    bodies = [policy] + ([critic] if critic is not None else [])
    adapters = sum(b.lora_params(m.lora.rank, targets) for b in bodies) if m.lora.rank > 0 else 0
    total = policy.params() + (critic.params(lm_head=False) if critic is not None else 0) + adapters
    trainable = adapters if m.lora.rank > 0 else total
    tokens, scored, micro, no_grad = _tokens(cfg)
    opt = OPTIMIZER_STATE_BYTES[lrn.optimizer]
    off = lrn.offload_optimizer
    t, notes = {}, {}
    if lrn.backend == "fsdp2":
        t["weights"] = 0 if off else 4 * total // w
        notes["weights"] = f"float32 shards of {total / 1e9:.2f}B parameters over {w} rank(s)" + (
            " (on the CPU: offload)" if off else "")
        gathered = total if stage == 2 else 2 * max(b.block_params() for b in bodies)
        t["gathered parameters"] = d * gathered
        notes["gathered parameters"] = ("every block kept gathered from forward to backward (zero_stage 2)"
                                        if stage == 2 else "a block and the next one (zero_stage 3)")
        t["optimizer states"] = 0 if off else opt * trainable // w
        t["gradients"] = 4 * trainable if micro > 1 else 0  # unsharded float32, accumulated without sync
        step_grads, step_copy = (0 if off else 4 * trainable // w), 0
    else:
        t["weights"] = d * total // (w if stage == 3 else 1)
        notes["weights"] = f"{m.dtype} {total / 1e9:.2f}B parameters" + (
            f", ZeRO-3 over {w} rank(s)" if stage == 3 else "")
        sharded = w if stage >= 1 else 1
        t["master weights"] = 0 if off or d == 4 else 4 * trainable // sharded
        t["optimizer states"] = 0 if off else opt * trainable // sharded
        grads = d * trainable // (w if stage >= 2 else 1)
        # ZeRO-3 allocates its gradient partition at set-up (the H100 runs: 8 N bytes after set-up
        # under ZeRO-3, 6 N under ZeRO-2); ZeRO-0/1/2 hold gradients through a backward only when
        # an earlier micro-batch of the same step left them.
        t["gradients"] = grads if stage == 3 and not off else (grads if micro > 1 and not (off and stage >= 2) else 0)
        if stage == 3 and w > 1:
            t["gathered parameters"] = 2 * d * max(b.block_params() for b in bodies)
        step_grads = 0 if off else grads
        # bf16 ZeRO-1/2 step on a float32 copy of the gradient partition (ZeRO-3: one sub-group at a time)
        largest = DEEPSPEED_SUB_GROUP if stage == 3 else trainable
        step_copy = 0 if off or d == 4 else 4 * min(trainable // sharded, largest)
    t.update(_learner_activations(cfg, bodies, tokens, scored, no_grad, t, gpu_bytes, notes))
    if p.uses_critic:
        h = bodies[-1].hidden
        t["value head"] = 16 * (h + 1) + 4 * scored * h  # float32 weight, gradient, AdamW m and v; its float32 input
    if lrn.backend == "deepspeed":
        bucket = {1: DEEPSPEED_REDUCE_BUCKET, 2: 2 * DEEPSPEED_REDUCE_BUCKET, 3: 2 * policy.hidden ** 2}.get(stage, 0)
        # Allocated at the first parameter's gradient, after the log-softmax's backward freed its
        # working copies: the peak holds the larger of the two (the estimate is then within 0.5% of
        # all six H100 peaks; adding both would put the ZeRO-2 ones ~1.9 GiB high).
        transient = logit_bytes(scored, policy.vocab, d, lrn.logprob_chunk) - scored * policy.vocab * d
        t["reduce buckets"] = max(0, d * bucket - transient)
    backward_phase = sum(t.values())
    step_phase = sum(t[k] for k in ("weights", "master weights", "optimizer states") if k in t) + step_grads + step_copy
    t["optimizer step"] = max(0, step_phase - backward_phase)
    notes["optimizer step"] = "what the step holds beyond the backward's peak (gradients and their float32 copy)"
    t["CUDA context"] = CUDA_CONTEXT
    notes.setdefault("gradients", f"{micro} micro-batch(es) per step" + (", ZeRO-3's partition" if stage == 3 else ""))
    return RoleEstimate("learner", lrn.num_ranks, {k: v for k, v in t.items() if v > 0}, notes)


def _learner_activations(cfg: Config, bodies: list[ModelShape], tokens: int, scored: int, no_grad: int,
                         state: dict[str, int], gpu_bytes: int | None, notes: dict[str, str]) -> dict[str, int]:
    """The "activations" and "logits" terms of the larger of a training micro-batch and a no-grad pass."""
    m, lrn = cfg.model, cfg.learner
    d, policy = DTYPE_BYTES[m.dtype], bodies[0]
    lora = m.lora.rank > 0
    adapted = len([t for t in m.lora.target_modules if t in LORA_MODULES]) if lora else 0

    def layers(ckpt: bool) -> int:
        return sum(layer_activation_bytes(tokens, b.hidden, b.intermediate, b.layers, b.q_width, d, ckpt,
                                          trainable_norms=not lora, lora_rank=m.lora.rank, lora_modules=adapted,
                                          q_width=b.q_width)
                   for b in bodies)

    logits = logit_bytes(scored, policy.vocab, d, lrn.logprob_chunk)
    ckpt = m.gradient_checkpointing
    how = "set"
    if ckpt is None:  # the learner's own rule (workers/learner.py), on the GPU left after the state
        free = gpu_bytes - CUDA_CONTEXT - sum(state.values()) if gpu_bytes else None
        ckpt = free is not None and layers(False) + logits > 0.8 * free
        how = "auto" if free is not None else "auto, GPU size unknown: assumed off"
    acts = layers(ckpt)
    notes["activations"] = (f"one micro-batch of {tokens} tokens, {sum(b.layers for b in bodies)} layers, "
                            f"gradient checkpointing {'on' if ckpt else 'off'} ({how})")
    notes["logits"] = f"{scored} scored positions x {policy.vocab} vocabulary, chunks of {lrn.logprob_chunk}"
    ng_scored = no_grad * episode_tokens(cfg) // (cfg.data.max_prompt_tokens + episode_tokens(cfg))
    ng_acts = sum(inference_bytes(no_grad, b, d) for b in bodies)
    ng_logits = ng_scored * policy.vocab * d + 8 * min(lrn.logprob_chunk, ng_scored) * policy.vocab
    if ng_acts + ng_logits > acts + logits:
        notes["activations"] = f"the no-grad pass of {no_grad} tokens (old logprobs and values)"
        notes["logits"] = f"{ng_scored} scored positions x {policy.vocab} vocabulary, no gradient"
        return {"activations": ng_acts, "logits": ng_logits}
    return {"activations": acts, "logits": logits}


def engine_estimate(cfg: Config, policy: ModelShape, gpu_bytes: int | None = None) -> RoleEstimate:
    """One rollout engine, per GPU of its tensor-parallel group. vLLM takes
    ``gpu_memory_utilization`` x the GPU for its weights, activations and KV cache (the KV cache
    fills whatever the others leave), and CUDA graphs beside it when ``enforce_eager`` is false.
    ``floor``: the weights, the context and the KV cache of one ``max_model_len`` sequence, which
    must fit in that fraction."""
    r, v = cfg.rollout, cfg.rollout.vllm
    d, tp = DTYPE_BYTES[cfg.model.dtype], r.tensor_parallel_size
    t = {"weights": d * policy.params() // tp}
    notes = {"weights": f"{cfg.model.dtype} {policy.params() / 1e9:.2f}B parameters"
             + (f" / {tp} GPUs" if tp > 1 else "")}
    kv_token = 2 * policy.layers * max(1, policy.kv_heads // tp) * policy.head_dim * d
    if gpu_bytes:
        rest = int(v.gpu_memory_utilization * gpu_bytes) - t["weights"] - CUDA_CONTEXT
        t["KV cache and activations"] = max(0, rest)
        notes["KV cache and activations"] = (f"the rest of {v.gpu_memory_utilization:g} x GPU: "
                                             f"at most ~{max(0, rest) // kv_token} tokens of KV cache")
    else:
        notes["KV cache and activations"] = f"the rest of {v.gpu_memory_utilization:g} x GPU (GPU size unknown)"
    t["CUDA context"] = CUDA_CONTEXT
    if not v.enforce_eager:
        t["CUDA graphs"] = CUDA_GRAPHS
        notes["CUDA graphs"] = "an allowance (rollout.vllm.enforce_eager false)"
    floor = t["weights"] + CUDA_CONTEXT + kv_token * r.max_model_len
    return RoleEstimate("rollout", r.num_engines, t, notes, floor=floor)


def frozen_estimate(cfg: Config, role: str, shape: ModelShape | None) -> RoleEstimate:
    """The reference actor (``role`` "reference") or the reward actor ("reward"; ``shape`` None
    when it scores with a function or an endpoint): weights in model.dtype and one no-grad
    micro-batch of full-length sequences; the reference also scores its float32 logprobs over
    the micro-batch's response positions at once (d + 8 bytes per logit)."""
    d = DTYPE_BYTES[cfg.model.dtype]
    t: dict[str, int] = {}
    notes: dict[str, str] = {}
    if shape is not None:
        mbs = cfg.reference.micro_batch_size if role == "reference" else cfg.reward.micro_batch_size
        tokens = mbs * (cfg.data.max_prompt_tokens + episode_tokens(cfg))
        t["weights"] = d * shape.params(lm_head=role == "reference")
        notes["weights"] = f"{cfg.model.dtype} {shape.params(lm_head=role == 'reference') / 1e9:.2f}B parameters"
        t["activations"] = inference_bytes(tokens, shape, d)
        notes["activations"] = f"one micro-batch of {mbs} x {tokens // mbs} tokens, no gradient"
        if role == "reference":
            t["logits"] = mbs * episode_tokens(cfg) * shape.vocab * (d + 8)
    else:
        notes["CUDA context"] = f"reward.kind {cfg.reward.kind}: no model on this GPU"
    t["CUDA context"] = CUDA_CONTEXT
    return RoleEstimate(role, 1, t, notes)


def role_estimates(cfg: Config, gpu_bytes: int | None = None, read=ModelShape.read) -> list[RoleEstimate]:
    """The estimate of every role that asks for a GPU (resources.<role>.num_gpus > 0), in placement
    order; empty for a CPU-only config. ``read(path)`` gives a model's shape (default: its config.json)."""
    res = cfg.resources
    out = []
    policy = None
    if any(getattr(res, r).num_gpus > 0 for r in ("rollout", "reference", "reward", "learner")):
        policy = read(cfg.model.path)
    if res.rollout.num_gpus > 0:
        out.append(engine_estimate(cfg, policy, gpu_bytes))
    if res.reference.num_gpus > 0 and not reference_from_learner(cfg):
        ref = read(cfg.reference.path) if cfg.reference.path else policy
        out.append(frozen_estimate(cfg, "reference", ref))
    if res.reward.num_gpus > 0:
        out.append(frozen_estimate(cfg, "reward", read(cfg.reward.model_path) if cfg.reward.kind == "model" else None))
    if res.learner.num_gpus > 0:
        critic_source = reward_model_for_value(cfg) or cfg.model.critic_path or cfg.model.path
        critic = read(critic_source) if cfg.model.separate_critic else None
        out.append(learner_estimate(cfg, policy, critic, gpu_bytes))
    return out
