"""Learner role: one data-parallel rank of the shared-body actor-critic, on the training engine
that learner.backend names (DeepSpeed ZeRO or FSDP2, ``rlhf_ray.backends.engine.TrainEngine``).

Each rank receives only its own slice of the iteration's experience. It computes old
logprobs and values for that slice, runs the PPO update (epochs x mini-batches x
micro-batches with gradient accumulation), and takes part in the weight sync (under ZeRO-3
every rank joins the gather; rank 0 sends).

Micro-batches: ``learner.micro_batch_size`` sequences, or with ``learner.micro_batch_tokens``
the fewest micro-batches of similar token counts that stay within that budget (the same
count on every rank); the engine's accumulation boundary is set per micro-batch, so the
count may change from step to step. With ``learner.packing`` (default) a micro-batch's
sequences are laid end to end in rows no longer than its longest sequence: (almost) no FLOP
is spent on padding, the attention stays within each sequence and costs at most the padded
batch's (``rlhf_ray.batch.pack_rows``).

Loss normalisation: token-level losses are divided by the token count of the whole
optimiser step (all ranks, all micro-batches), obtained by one all-reduce per epoch. The
engine makes the gradient the sum over ranks and micro-batches (its ``backward`` contract), so
it is exactly the full-batch gradient, however the batch is split.

The value head is trained outside the engine, in float32 on every backend, stage and dtype
(``rlhf_ray.backends.replicated``); it is saved beside the engine state in checkpoints.

Collaborators, built at set-up: the engine, the value head (``ReplicatedModule``), the
forward passes (``learner_passes.ForwardPasses``), the weight sender
(``learner_sync.WeightSender``) and the checkpoints (``learner_checkpoint``).
The methods the coordinator calls on them are this class's own, one line each.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlhf_ray.backends.engine import EngineSettings, StepOutcome, TrainEngine, hidden_size_of, train_backend
from rlhf_ray.backends.memory import needs_activation_checkpointing
from rlhf_ray.backends.replicated import ReplicatedModule, replicate
from rlhf_ray.batch import ExperienceBatch, TrainUpdate, plan_passes
from rlhf_ray.config import Config, LearnerConfig, ModelConfig, PPOConfig, resolve
from rlhf_ray.config.critic import reward_model_for_value
from rlhf_ray.models.actor_critic import POLICY_PREFIX
from rlhf_ray.models.lora import LoraSpec, adapters_disabled
from rlhf_ray.weight_sync.plan import Bucket, TensorSpec
from rlhf_ray.weight_sync.transport import serve_rendezvous
from rlhf_ray.workers.base import RoleBase
from rlhf_ray.workers.learner_checkpoint import LearnerCheckpoints
from rlhf_ray.workers.learner_passes import Forward, ForwardPasses
from rlhf_ray.workers.learner_sync import WeightSender, gather_export
from rlhf_ray.workers.learner_tally import EpochTally
from rlhf_ray.workers.objective import ppo_objective, value_objective


@dataclass(frozen=True)
class LearnerSpec:
    """What a learner rank reads: its own sections of the config and a few facts from others."""

    model: ModelConfig
    learner: LearnerConfig
    ppo: PPOConfig
    seed: int
    threads: int
    temperature: float  # rollout.temperature: tokens are scored under the distribution they were sampled from
    prompt_tokens: int  # data.max_prompt_tokens
    response_tokens: int  # rollout.max_new_tokens
    grad_accum_steps: int  # micro-batches per optimiser step per rank (nominal with a token budget)
    total_steps: int  # the engine's optimiser steps over the run (its learning-rate schedule's horizon)
    save_hf_policy: bool  # checkpoint.save_hf_policy
    call_timeout_s: float  # resources.call_timeout_s: the group's collectives time out after it
    sync_timeout_s: float  # sync.timeout_s
    value_from: str | None = None  # the reward model the critic starts from (model.value_init reward_model)
    value_head_steps: int | None = None  # the value head's optimiser steps over the run (None: total_steps)

    @staticmethod
    def from_config(cfg: Config) -> "LearnerSpec":
        sizes = resolve(cfg)
        engine_steps, head_steps = optimizer_steps(cfg.ppo, cfg.model)
        return LearnerSpec(cfg.model, cfg.learner, cfg.ppo, cfg.seed, cfg.resources.learner.threads,
                           cfg.rollout.temperature, cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens,
                           sizes.grad_accum_steps, engine_steps, cfg.checkpoint.save_hf_policy,
                           cfg.resources.call_timeout_s, cfg.sync.timeout_s, reward_model_for_value(cfg), head_steps)


def optimizer_steps(p: PPOConfig, m: ModelConfig) -> tuple[int, int]:
    """(engine, value head) optimiser steps over the run: the horizons of their learning-rate
    schedules, each counted in the steps it takes. Per iteration ppo.mini_batches steps per epoch.
    The head steps in every epoch: ppo.epochs + ppo.critic_epochs. The engine steps in the PPO
    epochs, in the critic epochs when the value gradient reaches a body (model.value_grad_to_body),
    and in a critic warm-up only with a separate critic (its body trains, the policy is held); with
    the shared body it takes no step there. E.g. 10 iterations, 2 of them warm-up, 1 epoch + 1
    critic epoch of 2 mini-batches, shared body: engine 8 x 4 = 32, head 10 x 4 = 40."""
    per_epoch = p.mini_batches
    warm = min(p.critic_warmup_iterations, p.iterations)
    value_epochs = p.critic_epochs if m.value_grad_to_body else 0
    warm_epochs = p.epochs + p.critic_epochs if m.separate_critic and m.value_grad_to_body else 0
    engine = (p.iterations - warm) * (p.epochs + value_epochs) * per_epoch + warm * warm_epochs * per_epoch
    return engine, p.iterations * (p.epochs + p.critic_epochs) * per_epoch


# How the ranks' ``train`` metrics combine into the group's: per-token means are weighted by
# each rank's response tokens (ranks hold different token counts), token counts add up, the
# slowest rank's time and the largest deviation count; the rest (grad norms, lr, step counts)
# are equal on every rank.
_SUMMED = ("learner_tokens", "learner_response_tokens")
_LARGEST = ("update_seconds", "onpolicy_ratio_dev")
_SAME_ON_EVERY_RANK = ("grad_norm", "value_head_grad_norm", "lr", "skipped_steps", "nonfinite_steps")


def combine_rank_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """One metrics dict from every rank's ``Learner.train`` output: the numbers one learner
    holding the whole batch would report (sum, then divide once). ``padding_fraction`` is
    weighted by the tokens each rank passed through the body, the per-token means by
    ``learner_response_tokens``. E.g. ranks with policy_loss 1.0 over 30 tokens and 4.0 over
    10 tokens give 1.75, not 2.5."""
    def weighted(key: str, weight: str) -> float:
        total = sum(p[weight] for p in parts)
        if total == 0:
            return sum(p[key] for p in parts) / len(parts)
        return sum(p[key] * p[weight] for p in parts) / total

    out = {}
    for k in parts[0]:
        if k in _SUMMED:
            out[k] = sum(p[k] for p in parts)
        elif k in _LARGEST:
            out[k] = max(p[k] for p in parts)
        elif k in _SAME_ON_EVERY_RANK:
            out[k] = parts[0][k]
        elif k == "padding_fraction":
            out[k] = weighted(k, "learner_tokens")
        else:
            out[k] = weighted(k, "learner_response_tokens")
    return out


class Learner(RoleBase):
    role = "learner"

    def __init__(self, spec: LearnerSpec, rank: int) -> None:
        super().__init__(rank, spec.threads)
        self.spec = spec
        self.rank, self.world_size = rank, spec.learner.num_ranks
        self.engine: TrainEngine | None = None
        self.head: ReplicatedModule | None = None
        self.sender = WeightSender(rank, spec.sync_timeout_s, self.node_ip)
        self.checkpoints: LearnerCheckpoints | None = None
        self.shard: ExperienceBatch | None = None  # this rank's slice, kept from compute_old for train

    # ------------------------------------------------------------------ set-up
    def master_address(self, loopback: bool = False) -> tuple[str, int]:
        """Where the learner group (rank 0) listens; call on rank 0 before ``setup``.

        The group's TCPStore server starts here, on 127.0.0.1 when ``loopback`` (every rank runs
        on this machine) or else on this node's address only, at a port the
        kernel picks, and stays up: in ``setup`` torch's env:// rendezvous (the engine's
        ``join_group``) creates rank 0's store with ``multi_tenant=True``, which reuses this server instead of
        binding the port again. So the port cannot be taken in between (as after ``free_port``)
        and the store does not listen on every interface."""
        host = "127.0.0.1" if loopback else self.node_ip()
        host, port, self._master_store = serve_rendezvous(host, self.spec.call_timeout_s)
        return host, port

    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the group, load the actor-critic (sharded as it loads where the engine does so)
        and build the engine.

        The value head is held outside the engine, float32 on every backend, stage and dtype
        (see ``rlhf_ray.backends.replicated``); the engine holds the body (and a separate critic)."""
        from rlhf_ray.models import ActorCritic
        from rlhf_ray.models.export import export_plan

        spec = self.spec
        m, lrn = spec.model, spec.learner
        backend = train_backend(lrn.backend)
        backend.join_group(master_addr, master_port, self.rank, self.world_size, spec.call_timeout_s)
        torch.manual_seed(spec.seed)  # the value head starts identical on every rank
        heads = []

        def load() -> torch.nn.Module:
            model = ActorCritic.from_pretrained(
                m.path, value_head_init_std=m.value_head_init_std, value_grad_to_body=m.value_grad_to_body,
                separate_critic=m.separate_critic, critic_path=m.critic_path,
                torch_dtype=torch.bfloat16 if m.dtype == "bfloat16" else torch.float32,
                lora=LoraSpec.of(m.lora), attn_implementation=m.attn_implementation, value_from=spec.value_from)
            heads.append(model.detach_value_head())
            return model

        settings = EngineSettings(lrn, m.dtype, spec.grad_accum_steps, spec.total_steps, hidden_size_of(m.path))
        self.engine = backend.build(load, settings)
        self.device = self.engine.device  # cuda:0 of the GPU Ray assigned, or cpu
        # Critic-free estimators train no value network: the head is dropped, not trained.
        head_steps = spec.value_head_steps if spec.value_head_steps is not None else spec.total_steps
        self.head = (replicate(heads[0], lrn, head_steps, self.device, self.world_size,
                               self.engine.outside_grad_scale) if spec.ppo.uses_critic else None)
        self.checkpoints = LearnerCheckpoints(self.engine, self.head, self.rank, m, spec.save_hf_policy)
        self.passes = ForwardPasses(self.engine, self.head, lrn, spec.temperature, self.world_size)
        self.checkpointing = self._choose_checkpointing()
        if self.checkpointing:
            self.engine.module.policy.gradient_checkpointing_enable()
            if self.engine.module.critic_body is not None:
                self.engine.module.critic_body.gradient_checkpointing_enable()
        packing_gap = self.passes.check_packing(m.dtype) if lrn.packing else None
        # A sync sends what training changes: every policy tensor, or with LoRA the adapted layers merged.
        self.sender.bind(self.engine, export_plan(self.engine.module.policy, POLICY_PREFIX, changed_only=True))
        params = list(self.engine.module.parameters())
        full = lambda p: math.prod(self.engine.full_shape(p))  # noqa: E731
        n = sum(full(p) for p in params)
        trainable = sum(full(p) for p in params if p.requires_grad)
        head = sum(p.numel() for p in self.head.params) if self.head is not None else 0
        return {"rank": self.rank, "parameters": n + head, "trainable_parameters": trainable + head,
                "backend": lrn.backend, "zero_stage": lrn.zero_stage, "gradient_checkpointing": self.checkpointing,
                "packing_gap": packing_gap}


    def _choose_checkpointing(self) -> bool:
        """model.gradient_checkpointing, or when unset: on only if one micro-batch's activations
        would not fit the device memory left after the model and optimiser (never on the CPU)."""
        wanted = self.spec.model.gradient_checkpointing
        if wanted is not None:
            return wanted
        if self.device.type != "cuda":
            return False
        body = self.engine.module.policy.config.get_text_config()
        lrn, longest = self.spec.learner, self.spec.prompt_tokens + self.spec.response_tokens
        tokens = lrn.micro_batch_tokens or lrn.micro_batch_size * longest
        response_tokens = tokens * self.spec.response_tokens // longest
        free, _ = torch.cuda.mem_get_info(self.device)
        local_params = sum(self.engine.local_numel(p) for p in self.engine.module.parameters())  # this rank's share
        bodies = 2 if self.engine.module.critic_body is not None else 1
        return needs_activation_checkpointing(
            tokens * bodies, response_tokens, body.hidden_size, body.intermediate_size, body.num_hidden_layers,
            body.vocab_size, free_bytes=free - 2 * local_params)

    @torch.no_grad()
    def compute_old(self, shard: ExperienceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Old logprobs and values (B, R) of this rank's slice at the current weights. The slice
        is kept (with them) for ``train``, which then receives only the advantages phase's output."""
        R = shard.response_mask.shape[1]
        logprobs = torch.zeros(len(shard), R)
        values = torch.zeros(len(shard), R)

        def fill(rows: torch.Tensor, mb: ExperienceBatch, f: Forward) -> None:
            r = f.logprobs.shape[1]
            logprobs[rows, :r] = (f.logprobs * mb.response_mask).float().cpu()
            if f.values is not None:  # critic-free estimators have no values: they stay 0
                values[rows, :r] = (f.values * mb.response_mask).cpu()

        self.passes.no_grad(shard, fill)
        self.shard = shard.replace(old_logprobs=logprobs, old_values=values)
        return logprobs, values

    @torch.no_grad()
    def reference_logprobs(self, batch: ExperienceBatch, temperature: float) -> torch.Tensor:
        """(B, R) float32 reference logprobs of this rank's slice of ``batch`` (``batch.split`` over
        the ranks, as the coordinator slices it for ``compute_old``), computed by the base model:
        the policy with its LoRA adapters off (reference.from_learner). Every rank must call it
        (ZeRO-3 gathers in each forward); 0 at padding."""
        if temperature != self.spec.temperature:
            raise ValueError(f"reference at temperature {temperature}, but the learner scores at "
                             f"{self.spec.temperature} (rollout.temperature)")
        if self.spec.model.lora.rank == 0:
            raise RuntimeError("reference_logprobs needs LoRA (model.lora.rank > 0): without adapters the "
                               "learner's policy is not the reference; use the reference role.")
        shard = batch.split(self.world_size)[self.rank]
        out = torch.zeros(shard.response_mask.shape)

        def fill(rows: torch.Tensor, mb: ExperienceBatch, f: Forward) -> None:
            out[rows, :f.logprobs.shape[1]] = (f.logprobs * mb.response_mask).float().cpu()

        with adapters_disabled(self.engine.module.policy):
            self.passes.no_grad(shard, fill)
        return out

    # ------------------------------------------------------------------ PPO update
    def _step_plan(self, minis: list[ExperienceBatch]) -> tuple[list[tuple[float, float]], list[list[torch.Tensor]]]:
        """For each mini-batch (one optimiser step): its valid token and sequence counts over all
        ranks (one all-reduce), and this rank's micro-batches as row indices. With a token budget
        every rank splits its share into the same number of micro-batches (the most any rank
        needs): ZeRO-3 gathers parameters in every forward, so all ranks must run as many."""
        lrn = self.spec.learner
        counts = torch.tensor([[float(m.num_response_tokens()), float(m.response_mask.any(-1).sum())]
                               for m in minis], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        counts = [tuple(c) for c in counts.cpu().tolist()]
        budget = lrn.micro_batch_tokens
        if budget > 0:
            lengths = [m.attention_mask.sum(-1).tolist() for m in minis]
            own = [len(plan_passes(len(ls), lengths=ls, max_tokens=budget)) for ls in lengths]
            parts = torch.tensor(own, device=self.device)
            dist.all_reduce(parts, op=dist.ReduceOp.MAX)
            plans = [plan_passes(len(ls), lengths=ls, max_tokens=budget, parts=int(k))
                     for ls, k in zip(lengths, parts.cpu().tolist())]
        else:
            plans = [plan_passes(len(m), max_rows=lrn.micro_batch_size) for m in minis]
        return counts, [[torch.tensor(rows) for rows in plan] for plan in plans]

    def train(self, update: TrainUpdate, iteration: int) -> dict[str, float]:
        """One PPO update over the slice kept from ``compute_old`` with ``update``'s advantages,
        returns and mask: ppo.epochs, then ppo.critic_epochs value-only epochs (metrics
        ``critic_epochs/*``); returns this rank's metrics. ``update.value_only`` (a critic warm-up
        iteration): ppo.epochs + ppo.critic_epochs value-only epochs and nothing else, the policy
        stays exactly as it is (no policy metrics).

        Metrics stay on the device until the end (no host sync per micro-batch); the only
        per-step sync is the value head's skip decision."""
        if self.shard is None:
            raise RuntimeError(f"learner rank {self.rank}: train() without compute_old() on this iteration's slice")
        shard, self.shard = update.apply_to(self.shard), None
        p = self.spec.ppo
        self.engine.train()
        gen = torch.Generator().manual_seed(self.spec.seed * 7919 + iteration * 31 + self.rank)
        t0 = time.perf_counter()
        if update.value_only:
            main = self._epochs(shard, gen, p.epochs + p.critic_epochs, update.kl_coef, value_only=True, warmup=True)
            metrics = main.metrics()
        else:
            main = self._epochs(shard, gen, p.epochs, update.kl_coef, value_only=False)
            metrics = main.metrics()
            if p.critic_epochs:
                extra = self._epochs(shard, gen, p.critic_epochs, 0.0, value_only=True)
                metrics.update({f"critic_epochs/{k}": v for k, v in extra.metrics().items()})
                main.add_passes(extra)
        metrics["lr"] = self.engine.lr()
        metrics["learner_tokens"] = float(main.pass_tokens)
        metrics["learner_response_tokens"] = main.tokens  # the weight of this rank's per-token means
        metrics["padding_fraction"] = 1.0 - main.real_tokens / max(main.pass_tokens, 1)
        metrics["update_seconds"] = time.perf_counter() - t0
        return metrics

    def _epochs(self, shard: ExperienceBatch, gen: torch.Generator, epochs: int, kl_coef: float, value_only: bool,
                warmup: bool = False) -> EpochTally:
        """``epochs`` passes over ``shard`` in ppo.mini_batches optimiser steps each: PPO steps, or
        value-only steps (``value_only``; ``warmup``: a critic warm-up's).

        A value-only step trains the value head, and the body it reads when the value gradient
        reaches one (:meth:`_value_reaches_body`): that body's step holds the policy's parameter
        group with a separate critic (the policy stays exactly as it is); with the shared body
        (critic epochs only) the body is the policy and steps. Where no gradient reaches a body,
        the engine takes neither a backward nor a step: a step with zero gradients would still
        move its weights (Adam's momentum, weight decay) and advance its schedule."""
        lrn, tally = self.spec.learner, EpochTally(value_only, self.head is not None)
        body_grad = not value_only or self._value_reaches_body(warmup)
        hold = ("policy",) if value_only and self.spec.model.separate_critic else ()
        for _ in range(epochs):
            minis = shard.select(torch.randperm(len(shard), generator=gen)).split(self.spec.ppo.mini_batches)
            counts, plans = self._step_plan(minis)
            for mini, (count, sequences), parts in zip(minis, counts, plans):
                if count == 0:  # all of this step's samples were quarantined, on every rank (the count is global)
                    tally.skipped_steps += 1
                    continue
                for j, rows in enumerate(parts):
                    micro = mini.select(rows).trim()
                    n_tok = float(micro.num_response_tokens())  # on the host, before the copy
                    real = int(micro.attention_mask.sum())
                    tally.real_tokens += real
                    tally.pass_tokens += real if lrn.packing else micro.input_ids.numel()
                    last = j == len(parts) - 1
                    if value_only:
                        stats = self._value_micro_step(micro.to(self.device), count, last, body_grad)
                    else:
                        stats = self._micro_step(micro.to(self.device), count, sequences, kl_coef, last)
                    tally.add(stats, n_tok)
                outcome = self.engine.step(hold=hold) if body_grad else StepOutcome(True, None)
                tally.nonfinite_steps += int(not outcome.applied)
                if self.head is not None:
                    tally.head_norms.append(self.head.step(engine_stepped=outcome.applied))
                if outcome.grad_norm is not None:
                    tally.grad_norms.append(outcome.grad_norm)
        return tally

    def _value_reaches_body(self, warmup: bool) -> bool:
        """Whether a value-only step trains a body: model.value_grad_to_body, except in a critic
        warm-up with the shared body (the body is the policy, which a warm-up leaves as it is)."""
        m = self.spec.model
        return m.value_grad_to_body and (m.separate_critic or not warmup)

    def _micro_step(self, mb: ExperienceBatch, step_tokens: float, step_sequences: float,
                    kl_coef: float, last: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch (``last``: the step's last on this rank; the
        caller steps the engine after it). The policy loss is aggregated by ppo.loss_agg over the
        whole step's token and sequence counts (all ranks), so any split of the step sums to the
        same update. Returns detached per-token means over this micro-batch (device tensors)."""
        p = self.spec.ppo
        f = self.passes.forward(mb, entropy="grad" if p.entropy_coef > 0 else "log")
        loss, stats = ppo_objective(p, mb, f.logprobs, f.values, f.entropy, step_tokens=step_tokens,
                                    step_sequences=step_sequences, kl_coef=kl_coef, max_len=self.spec.response_tokens)
        self.engine.backward(loss, last)
        return stats

    def _value_micro_step(self, mb: ExperienceBatch, step_tokens: float, last: bool,
                          body_grad: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch of a value-only step: the value loss alone
        (``value_objective``). With ``body_grad`` through the engine's backward (a body gets the
        value gradient); without, the bodies ran with no graph and autograd reaches the value head
        alone, scaled as the engine's backward would (``outside_grad_scale``) so the head's step
        reads the same gradient either way."""
        values = self.passes.values(mb, body_grad)
        loss, stats = value_objective(self.spec.ppo, mb, values, step_tokens=step_tokens)
        if body_grad:
            self.engine.backward(loss, last)
        else:
            (loss * self.engine.outside_grad_scale).backward()
        return stats

    # ------------------------------------------------------------------ weight sync and checkpoints
    def weight_specs(self) -> list[TensorSpec]:
        """The policy tensors a sync sends (never the value head), under HF names."""
        return self.sender.weight_specs()

    def sync_is_partial(self) -> bool:
        """Whether a sync leaves layers out (LoRA: only the adapted layers travel), so the engines'
        "weights were not loaded" warnings for the others are expected; from the export plan."""
        return self.sender.partial

    def sync_address(self, loopback: bool = False) -> tuple[str, int]:
        """Where the weight-sync group's store will listen (rank 0; ``WeightSender.sync_address``)."""
        return self.sender.sync_address(loopback)

    def init_sync_group(self, master_addr: str, master_port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0 joins the broadcast group with the rollout engines (``WeightSender.init_sync_group``)."""
        self.sender.init_sync_group(master_addr, master_port, world_size, timeout_s)

    def broadcast_weights(self, buckets: list[Bucket]) -> dict[str, float]:
        """Collective transport; every rank calls (``WeightSender.broadcast_weights``)."""
        return self.sender.broadcast_weights(buckets)

    def export_arrays(self, buckets: list[Bucket]) -> list:
        """Object-store transport; every rank calls (``WeightSender.export_arrays``)."""
        return self.sender.export_arrays(buckets)

    def policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full policy weights under HF names on rank 0 (adapted layers merged; None elsewhere);
        all ranks must call."""
        from rlhf_ray.models.export import export_plan

        out = gather_export(self.engine, export_plan(self.engine.module.policy, POLICY_PREFIX), keep=self.rank == 0)
        return out if self.rank == 0 else None

    def save_checkpoint(self, path: str, tokenizer_path: str | None = None) -> bool:
        """All ranks: this rank's part of a checkpoint under ``path`` (``LearnerCheckpoints.save``)."""
        self.checkpoints.save(path, tokenizer_path)
        return True

    def load_checkpoint(self, path: str) -> bool:
        """All ranks: restore what ``save_checkpoint`` wrote (``LearnerCheckpoints.load``)."""
        self.checkpoints.load(path)
        return True
