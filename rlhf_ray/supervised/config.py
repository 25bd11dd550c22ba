"""Config trees of the two stages before PPO: supervised fine-tuning and reward-model training.

Same conventions as ``rlhf_ray.config`` (frozen dataclasses, the string literal under a field is its
``--help`` text, YAML plus ``--section.field value`` overrides, one ``ConfigError`` listing every
problem before anything starts). The learner section (``LearnerConfig``) and the per-rank
resources (``RoleResources``) are the PPO tree's own; the data and training sections are new.

Batch sizes: ``train.batch_size`` sequences (SFT) or pairs (RM) per optimiser step over all
ranks; each rank takes ``batch_size / learner.num_ranks`` of them in micro-batches of
``learner.micro_batch_size``. Both divisions must be exact (see :func:`resolve_trainer`).

Choices are ``Literal`` annotations; the ones the PPO tree has too (dtype, tiny model, template,
too-long handling) are the same ones, from ``rlhf_ray.config.choices``.

This module imports only the standard library.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from rlhf_ray.config import (Config, ConfigError, Dtype, LearnerConfig, RoleResources, Template, TinyModel, TooLong,
                             choice_errors, field_errors, interface_errors, optimizer_errors, raise_if_any,
                             resource_errors)

FileFormat = Literal["auto", "jsonl", "parquet"]
Stage = Literal["sft", "rm", "ppo"]  # the pipeline's stages, in the order they run


@dataclass(frozen=True)
class TrainModelConfig:
    path: str = "artifacts/tiny-llama"
    """Starting checkpoint (Hugging Face directory): the base model for SFT, usually the SFT output for the RM."""
    build_tiny: TinyModel | None = None
    """If "llama" or "qwen2" and `path` holds no model yet, build a tiny offline causal LM there first (demo/tests)."""
    dtype: Dtype = "float32"
    """Parameter dtype: float32 or bfloat16 (bfloat16 needs a GPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""


@dataclass(frozen=True)
class SFTDataConfig:
    train_path: str = "artifacts/demo_data/sft.jsonl"
    """Training records: a .jsonl or .parquet file (read with Hugging Face `datasets`)."""
    eval_path: str | None = None
    """Held-out records; unset: hold out data.eval_fraction of train_path."""
    eval_fraction: float = 0.1
    """Share of train_path held out for evaluation when data.eval_path is unset (0: no evaluation)."""
    format: FileFormat = "auto"
    """File format: auto (from the extension), jsonl or parquet."""
    template: Template = "plain"
    """plain: prompt + response text fields. chat: a list of messages rendered with the tokenizer's chat template."""
    prompt_field: str = "prompt"
    """Field with the prompt text (template plain)."""
    response_field: str = "response"
    """Field with the response text (template plain); the loss covers only its tokens."""
    messages_field: str = "messages"
    """Field with the chat messages [{role, content}, ...] ending in an assistant turn (template chat)."""
    max_len: int = 128
    """Longest tokenised prompt + response; longer records are handled per data.too_long."""
    too_long: TooLong = "truncate"
    """Records over data.max_len: truncate (cut the response end; counted), drop (counted) or error."""
    add_eos: bool = True
    """Append the tokenizer's EOS to each response (unless it already ends with it), so the model learns to stop."""
    demo: bool = False
    """If true and data.train_path does not exist, write the offline demo data set into its directory first."""


@dataclass(frozen=True)
class PreferenceDataConfig:
    train_path: str = "artifacts/demo_data/preference.jsonl"
    """Training pairs: a .jsonl or .parquet file (read with Hugging Face `datasets`)."""
    eval_path: str | None = None
    """Held-out pairs; unset: hold out data.eval_fraction of train_path."""
    eval_fraction: float = 0.1
    """Share of train_path held out for the pairwise accuracy when data.eval_path is unset."""
    format: FileFormat = "auto"
    """File format: auto (from the extension), jsonl or parquet."""
    template: Template = "plain"
    """plain: prompt + chosen/rejected text fields. chat: chosen/rejected are message lists rendered with the chat template."""
    prompt_field: str = "prompt"
    """Field with the prompt (text for plain; optional leading messages for chat)."""
    chosen_field: str = "chosen"
    """Field with the preferred response (text, or messages ending in an assistant turn for chat)."""
    rejected_field: str = "rejected"
    """Field with the other response."""
    margin_field: str | None = None
    """Optional field with a per-pair margin m: the loss then asks for r_chosen - r_rejected > m."""
    max_len: int = 128
    """Longest tokenised prompt + response of either side; longer pairs are handled per data.too_long."""
    too_long: TooLong = "truncate"
    """Pairs over data.max_len: truncate (cut the response end; counted), drop (counted) or error."""
    demo: bool = False
    """If true and data.train_path does not exist, write the offline demo data set into its directory first."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    """Passes over the training set."""
    batch_size: int = 32
    """Sequences (SFT) or pairs (RM) per optimiser step, over all ranks; the last partial batch of an epoch is skipped."""
    max_steps: int = 0
    """Stop after this many optimiser steps in total (0: no limit); for smoke tests."""
    shuffle: bool = True
    """Reshuffle the training set every epoch (seeded by the run's seed)."""
    output_dir: str = "artifacts/sft"
    """Where the trained model is saved as a standard Hugging Face checkpoint, with its tokenizer and metrics.jsonl."""
    tensorboard: bool = False
    """Also write the per-epoch metrics as TensorBoard events under <output_dir>/tensorboard."""
    placement_timeout_s: float = 120.0
    """Give up with an error if the trainer ranks' placement group is not ready by then."""
    network_interface: str | None = None
    """Multi-node: the interface the ranks' gloo/NCCL group uses (see the PPO config's resources.network_interface)."""
    call_timeout_s: float = 1800.0
    """Timeout of any single remote call (set-up, one epoch, evaluation, saving)."""
    checkpoint_every: int = 0
    """Save the trainer state (every rank's model, optimiser and scheduler, and the position in the
    data) under <output_dir>/checkpoints every this many optimiser steps and at the end of every
    epoch (0: never). The last checkpoint_keep_last complete ones are kept."""
    checkpoint_keep_last: int = 2
    """Complete trainer checkpoints to keep; older ones are deleted after a new one is written."""
    resume: bool = False
    """Continue from the newest complete checkpoint under <output_dir>/checkpoints: the same step of
    the same epoch, with the same data order (no checkpoint there: start from model.path)."""


@dataclass(frozen=True)
class SFTRunConfig:
    name: str = "sft"
    """Run name, used in actor names and logs."""
    seed: int = 0
    """Seed for the data split, data order and initialisation."""
    model: TrainModelConfig = field(default_factory=TrainModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    resources: RoleResources = field(default_factory=RoleResources)


@dataclass(frozen=True)
class RMRunConfig:
    name: str = "rm"
    """Run name, used in actor names and logs."""
    seed: int = 0
    """Seed for the data split, data order and the score head's initialisation."""
    model: TrainModelConfig = field(default_factory=TrainModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="artifacts/rm"))
    center_rewards_coef: float = 0.0
    """Adds center_rewards_coef * (r_chosen + r_rejected)^2 per pair to the Bradley-Terry loss, so scores
    sit around 0 for every prompt and compare across prompts (0: off; 0.01 is common)."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    resources: RoleResources = field(default_factory=RoleResources)


TrainerRunConfig = SFTRunConfig | RMRunConfig


# --------------------------------------------------------------------------- derived sizes


@dataclass(frozen=True)
class TrainerSizes:
    """Per-rank sizes derived once from the config (counts are sequences or pairs)."""

    per_rank_batch: int  # train.batch_size / learner.num_ranks
    grad_accum_steps: int  # micro-batches per rank per optimiser step


def resolve_trainer(cfg: TrainerRunConfig) -> TrainerSizes:
    """Derive per-rank sizes; ConfigError naming the flags when a division is not exact."""
    b, lrn = cfg.train.batch_size, cfg.learner
    errors = []
    if b % lrn.num_ranks:
        errors.append(f"--train.batch_size {b} is not divisible by --learner.num_ranks {lrn.num_ranks}; "
                      "change one of them.")
    elif (b // lrn.num_ranks) % lrn.micro_batch_size:
        errors.append(f"per-rank batch {b // lrn.num_ranks} (--train.batch_size {b} / --learner.num_ranks "
                      f"{lrn.num_ranks}) is not divisible by --learner.micro_batch_size {lrn.micro_batch_size}; "
                      "change one of them.")
    if errors:
        raise ConfigError("batch sizes do not divide:\n  - " + "\n  - ".join(errors))
    per_rank = b // lrn.num_ranks
    return TrainerSizes(per_rank, per_rank // lrn.micro_batch_size)


# --------------------------------------------------------------------------- validation

_POSITIVE = ["data.max_len", "train.epochs", "train.batch_size", "train.placement_timeout_s",
             "train.call_timeout_s", "learner.num_ranks", "learner.micro_batch_size",
             "learner.forward_batch_size", "learner.lr", "train.checkpoint_keep_last"]


# The PPO learner's options that the supervised trainers do not have: refused instead of ignored.
_PPO_ONLY = {"value_head_lr": None, "micro_batch_tokens": 0, "forward_max_tokens": 0}


def _common_errors(cfg: TrainerRunConfig) -> list[str]:
    errors = field_errors(cfg, _POSITIVE) + optimizer_errors(cfg.learner)
    errors += resource_errors(cfg.resources, "resources")
    errors += interface_errors(cfg.train.network_interface, "--train.network_interface")
    if cfg.train.max_steps < 0:
        errors.append("--train.max_steps must be >= 0 (0: no limit).")
    if cfg.train.checkpoint_every < 0:
        errors.append("--train.checkpoint_every must be >= 0 (0: no checkpoints).")
    if not 0 <= cfg.data.eval_fraction < 1:
        errors.append(f"--data.eval_fraction must be in [0, 1) (got {cfg.data.eval_fraction}).")
    for name, unset in _PPO_ONLY.items():
        if getattr(cfg.learner, name) != unset:
            errors.append(f"--learner.{name} has no effect in SFT/RM training (a PPO learner option); unset it.")
    if not cfg.train.output_dir:
        errors.append("--train.output_dir must name a directory for the trained model.")
    try:
        resolve_trainer(cfg)
    except ConfigError as exc:
        errors.append(str(exc))
    return errors


def validate_sft(cfg: SFTRunConfig) -> TrainerSizes:
    """Check an SFT config as a whole; one ConfigError lists every problem."""
    raise_if_any(_common_errors(cfg))
    return resolve_trainer(cfg)


def validate_rm(cfg: RMRunConfig) -> TrainerSizes:
    """Check a reward-model config as a whole; one ConfigError lists every problem."""
    errors = _common_errors(cfg)
    if cfg.data.eval_path is None and cfg.data.eval_fraction <= 0:
        errors.append("the reward model reports held-out pairwise accuracy: set --data.eval_fraction > 0 "
                      "or --data.eval_path.")
    if cfg.data.chosen_field == cfg.data.rejected_field:
        errors.append(f"--data.chosen_field and --data.rejected_field are both {cfg.data.chosen_field!r}.")
    if cfg.center_rewards_coef < 0:
        errors.append(f"--center_rewards_coef {cfg.center_rewards_coef} must be >= 0 (0 turns centering off).")
    raise_if_any(errors)
    return resolve_trainer(cfg)


# --------------------------------------------------------------------------- the whole pipeline


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "pipeline"
    """Pipeline name, used in logs."""
    stages: tuple[Stage, ...] = ("sft", "rm", "ppo")
    """Stages to run, in order, e.g. --stages "[rm, ppo]"; a stage left out reuses the outputs an earlier run left."""
    demo_data_dir: str | None = "artifacts/pipeline/data"
    """Write the offline demo data (sft.jsonl, preference.jsonl, prompts.jsonl, eval_prompts.jsonl) here first,
    unless it already holds demo_task's set; unset: skip (the stages' data paths must exist)."""
    demo_task: Literal["compare", "digits", "tools"] = "compare"
    """Which demo data to write: compare ("which is larger", with held-out prompts and a gold check), digits, or
    tools ("multiply with a calculator": SFT episodes, prompts with answers, held-out prompts; no preference pairs)."""
    samples_shown: int = 8
    """After PPO: print this many held-out prompts with the SFT answer beside the final one (all go to samples.md)."""
    sft: SFTRunConfig = field(default_factory=SFTRunConfig)
    rm: RMRunConfig = field(default_factory=RMRunConfig)
    ppo: Config = field(default_factory=Config)


def validate_pipeline(cfg: PipelineConfig) -> None:
    """Each stage's own checks, plus the wiring: PPO starts from the SFT output and scores with the
    RM output (written out in the config, never filled in behind the user's back). A pipeline
    without an RM stage (the tool-use job: SFT -> PPO) may score with a reward function instead."""
    from rlhf_ray.config import validate

    errors = choice_errors(cfg, sections=False)  # demo_task; each stage's section checks its own below
    order = typing.get_args(Stage)
    known = all(s in order for s in cfg.stages)
    if not cfg.stages or not known or list(cfg.stages) != sorted(cfg.stages, key=order.index):
        errors.append(f"--stages {list(cfg.stages)}: choose from {', '.join(order)}, in that order.")
    for section, check in (("sft", validate_sft), ("rm", validate_rm), ("ppo", validate)):
        try:
            check(getattr(cfg, section))
        except ConfigError as exc:
            errors += [f"{section}: {line.strip().removeprefix('- ')}" for line in str(exc).splitlines()[1:]]
    sft_out, rm_out = cfg.sft.train.output_dir, cfg.rm.train.output_dir
    if cfg.ppo.model.path != sft_out:
        errors.append(f"--ppo.model.path {cfg.ppo.model.path!r} is not the SFT output --sft.train.output_dir "
                      f"{sft_out!r}; set them equal (PPO starts from the SFT model).")
    if cfg.ppo.reference.path not in (None, sft_out):
        errors.append(f"--ppo.reference.path {cfg.ppo.reference.path!r}: unset it or set it to {sft_out!r}.")
    if cfg.ppo.model.build_tiny:
        errors.append("--ppo.model.build_tiny must be unset: PPO's model is the SFT output.")
    if cfg.ppo.reward.kind == "model" and cfg.ppo.reward.model_path != rm_out:
        errors.append(f"PPO must score with the trained reward model: set --ppo.reward.model_path {rm_out!r} "
                      "(the --rm.train.output_dir).")
    elif cfg.ppo.reward.kind != "model" and "rm" in cfg.stages:
        errors.append(f"PPO must score with the trained reward model: set --ppo.reward.kind model and "
                      f"--ppo.reward.model_path {rm_out!r} (the --rm.train.output_dir), or leave rm out of "
                      "--stages to score with --ppo.reward.kind function.")
    if cfg.samples_shown < 0:
        errors.append("--samples_shown must be >= 0.")
    raise_if_any(errors)
