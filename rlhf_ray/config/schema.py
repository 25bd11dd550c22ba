"""The schema of a PPO run's config: one tree of frozen dataclasses.

The string literal under each field is its documentation; :mod:`rlhf_ray.config.docs` reads
it from each class's source (this file; the ``ppo`` section is in ``ppo_section.py``) and the
launcher prints it as ``--help``. So keep a string under
every leaf field, and keep the classes at module level (``field_docs`` parses each class's
source with ``ast``). A field a user picks from a fixed set is annotated with a ``Literal``
(:mod:`rlhf_ray.config.choices`): loading, validation and ``--help`` read its options there.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_ray.config.choices import Dtype, Template, TinyModel, TooLong
from rlhf_ray.config.ppo_section import PPOConfig
from rlhf_ray.config.role_sections import ReferenceConfig, RewardConfig, RolloutConfig, VLLMConfig


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
class LoraConfig:
    rank: int = 0
    """LoRA rank r of the adapters (PEFT); 0 trains every weight (full fine-tuning). With r > 0 only the adapters
    (and the value head) are trained, the reference is the base model with the adapters off, and a weight sync
    sends only the adapted layers' merged weights."""
    alpha: float = 16.0
    """LoRA alpha: the adapter's update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input; must stay 0: PPO's first on-policy ratio must be exactly 1 (refused otherwise)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Names (last component) of the linear layers that get adapters; the default covers every projection of a
    Llama/Qwen2-style block."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = "artifacts/tiny-llama"
    """Policy (SFT) checkpoint directory in Hugging Face format. The reference model defaults to it."""
    build_tiny: TinyModel | None = None
    """If "llama" or "qwen2" and `path` holds no model yet, build a tiny offline model there first (demo/tests)."""
    dtype: Dtype = "float32"
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
    value_init: Literal["policy", "reward_model"] = "policy"
    """Where the critic starts. policy: the value head saved in model.path (value_head.safetensors) if there is
    one, else a new head (model.value_head_init_std; zeros by default), and a separate critic's body from
    model.critic_path or model.path. reward_model: from the reward model (reward.model_path, reward.kind model),
    as InstructGPT did: with model.separate_critic the critic is the reward model (its body, its score head as the
    value head); with the shared body the value head starts as the reward model's score head (the hidden sizes
    must agree). Resuming a checkpoint keeps the checkpoint's critic."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory (~1/3 more step time). Unset (null):
    on only when one micro-batch's activations would not fit the GPU memory left after the model and
    optimiser (never on the CPU); true/false force it."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (model.lora.rank > 0 turns them on)."""
    attn_implementation: str | None = None
    """Attention kernel of the learner's model, as transformers names it (sdpa, eager, flash_attention_2,
    ...); unset: transformers' default (sdpa). With learner.packing the learner checks once at set-up that
    it keeps packed sequences apart, and stops with the fix if not."""


@dataclass(frozen=True)
class DataConfig:
    prompts: str = "builtin:digits"
    """Prompt source: a JSONL file path, or builtin:<name> for an offline generated demo set."""
    prompt_field: str = "prompt"
    """Field holding the prompt in each record: text (data.template plain), or a user message or a list of
    {role, content} messages (data.template chat)."""
    template: Template = "plain"
    """plain: each prompt is text, tokenised with the tokenizer's special tokens (its BOS) unless it already begins
    with BOS. chat: each prompt is rendered with the policy tokenizer's chat template up to the assistant's turn and
    tokenised without adding special tokens (the template writes them). The SFT and RM data's --data.template
    tokenise their prompts the same way, so use the value the policy and reward model were trained with."""
    num_builtin_prompts: int = 512
    """How many prompts a builtin generator produces."""
    max_prompt_tokens: int = 64
    """Prompts longer than this (in tokens) are handled per data.too_long."""
    too_long: TooLong = "drop"
    """What to do with a too-long prompt: drop (counted), truncate (keep the last tokens, after a leading BOS) or error."""
    shuffle: bool = True
    """Shuffle prompts each epoch over the dataset (seeded by the run's seed)."""


@dataclass(frozen=True)
class LearnerConfig:
    backend: Literal["deepspeed", "fsdp2"] = "deepspeed"
    """Training engine of the learner ranks (and the SFT/RM trainers): deepspeed (ZeRO 0-3, optimiser
    offload) or fsdp2 (PyTorch's fully_shard: parameters, gradients and optimiser state sharded over
    the ranks, bf16 compute with float32 reductions, checkpoints through torch.distributed.checkpoint).
    Both implement ``rlhf_ray.backends.engine.TrainEngine``."""
    num_ranks: int = 2
    """Data-parallel ranks (one Ray actor each)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """How much is sharded. deepspeed: the ZeRO stage, 0, 1, 2 or 3. fsdp2: 2 keeps a layer's
    parameters gathered from its forward to its backward (one all-gather per layer and step, like
    ZeRO-2's memory for parameters), 3 frees them after the forward and gathers again for the backward
    (least memory); 0 and 1 are refused."""
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
    """Lay each pass's sequences end to end, without padding, in rows no longer than its longest sequence
    (the attention stays within each sequence and costs at most the padded batch's). Needs an attention
    that keeps packed sequences apart: transformers' sdpa and eager masks do (Llama, Qwen2, Mistral, ...),
    flash attention does with the sequence boundaries the learner passes; the learner checks packed ==
    padded logprobs once at set-up and stops with the fix otherwise. false: pad to the longest prompt and
    response."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
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
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After the warm-up: constant, or cosine / linear decay to min_lr_ratio x lr at the last
    optimiser step of the run (PPO: ppo.iterations x steps per iteration; SFT/RM: train.epochs
    x steps per epoch, or train.max_steps if that is fewer)."""
    min_lr_ratio: float = 0.1
    """Where cosine / linear decay ends, as a fraction of the learning rate."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (0 disables it)."""
    offload_optimizer: bool = False
    """Optimiser state in CPU memory. deepspeed: ZeRO offload (ZeRO-1/2/3), updated by DeepSpeed's CPU
    Adam (built on first use, ~1 minute) or torch's AdamW where that cannot be built. fsdp2: FSDP2's CPU
    offload policy (sharded parameters, gradients and optimiser state live on the CPU; the step runs
    there)."""


@dataclass(frozen=True)
class SyncConfig:
    transport: Literal["collective", "object_store"] = "collective"
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
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
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
    gpu_memory_gib: float | None = None
    """Memory of one GPU in GiB (torch.cuda.get_device_properties(0).total_memory / 2**30 there) for the memory plan: with it, --dry-run and the
    pre-flight refuse a config whose estimated peak on a role's GPU exceeds it, naming the term and the
    options that would fix it. Unset: the GPUs of the launcher's machine, if it has any; else the plan is
    printed without a verdict."""
    network_interface: str | None = None
    """Multi-node runs: the network interface (e.g. eth1) the gloo/NCCL groups use, set for every actor as
    GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME. The stores listen on each node's Ray address: start Ray on
    each node with ray start --node-ip-address <its address on that interface>. Unset: the libraries choose."""


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
    """Print a full metrics line every this many iterations (without a terminal: the progress line)."""
    wandb: str | None = None
    """Weights & Biases project to log to as well (pip install rlhf_ray[wandb]); WANDB_MODE=offline
    writes the run locally (under WANDB_DIR, default <run_dir>/wandb) for a later `wandb sync`."""
    wandb_name: str | None = None
    """W&B run name (default: the run directory's name)."""
    dump_rollouts_every: int = 0
    """Every this many iterations write the batch's prompts, responses, rewards, per-sample KL and
    advantages to <run_dir>/rollouts/iter_NNNNNN.jsonl (0: never)."""
    ray_namespace: str = "rlhf_ray-{run}"
    """Ray namespace of the run's actors ({run}: the run directory's name); printed at start and saved
    in <run_dir>/ray.json, for ray.util.list_named_actors() / ray.get_actor(name, namespace=...) from
    another shell (a replaced actor is renamed <role>-<rank>-r<n>)."""
    filter_warnings: bool = True
    """Send known non-actionable library notices (accelerator detection, deprecations inside
    dependencies, thread binding, weight-loading bars) to <run_dir>/library_notices.log instead of the terminal."""


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
    every: int = 50
    """Save a checkpoint every this many iterations (0: only when the run ends). A dead learner rank
    restarts the learner group from the last checkpoint (with 0: from iteration 0), so this bounds
    the iterations redone then; each save writes the learner state (model, optimiser, and the policy
    with save_hf_policy). 50 redoes at most 50 iterations for one save per 50 updates, with keep_last
    bounding the disk used. Short runs (tests, CPU demos) may set their own, 0 included."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted after a new one is written."""
    save_on_stop: bool = True
    """Save a checkpoint when the run ends: at ppo.iterations, when stopped with Ctrl-C / SIGTERM, and
    before an error ends it that left the learner intact (a role other than the learners raised or
    could not be replaced, outside the update; or no sample was usable), so that after fixing e.g.
    the reward function, --resume continues from the last completed iteration."""
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

    def __post_init__(self) -> None:
        # The ppo choices left at auto, which depend on other settings, are filled in here, once, so
        # every role (and config.json) reads what runs; a choice that was given is never changed.
        object.__setattr__(self, "ppo", self.ppo.resolved(self.rollout.staleness))


def get_path(cfg: Any, dotted: str) -> Any:
    """The value at ``dotted`` (e.g. ``"ppo.clip_ratio"``) of a config tree."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg

