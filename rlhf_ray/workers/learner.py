"""Learner role: one DeepSpeed ZeRO data-parallel rank of the shared-body actor-critic.

Each rank receives only its own slice of the iteration's experience. It computes old
logprobs and values for that slice, runs the PPO update (epochs x mini-batches x
micro-batches with gradient accumulation), and takes part in the weight sync (under ZeRO-3
every rank joins the gather; rank 0 sends).

Loss normalisation: token-level losses are divided by the token count of the whole
optimiser step (all ranks, all micro-batches), obtained by one all-reduce per epoch.
DeepSpeed averages gradients over ranks, so each rank scales its loss by the world size and
backpropagates without DeepSpeed's 1/accumulation scaling; the sum is then exactly the
full-batch gradient, however the batch is split.
"""

from __future__ import annotations

import time
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist

from rlhf_ray.algorithms import (logprobs_and_entropy, logprobs_from_logits, masked_sum, ppo_policy_loss,
                                 value_loss)
from rlhf_ray.backends import deepspeed as ds
from rlhf_ray.batch import ExperienceBatch
from rlhf_ray.config import Config, resolve
from rlhf_ray.weight_sync.plan import Bucket, TensorSpec, dtype_name
from rlhf_ray.weight_sync.transport import free_port, new_sync_group, send_buckets, to_array
from rlhf_ray.workers.base import RoleBase


class _Forward(NamedTuple):
    logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    entropy: torch.Tensor | None  # (B, R); None when not asked for


class Learner(RoleBase):
    role = "learner"

    def __init__(self, cfg: Config, rank: int, world_size: int) -> None:
        super().__init__(cfg, rank, cfg.resources.learner.threads)
        self.rank, self.world_size = rank, world_size
        self.sizes = resolve(cfg)
        self.engine = None
        self.sync_group = None

    # ------------------------------------------------------------------ set-up
    def master_address(self) -> tuple[str, int]:
        """Where the learner group (rank 0) listens; call on rank 0 before ``setup``."""
        return self.node_ip(), free_port()

    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the group, load the actor-critic (sharded under ZeRO-3) and build the engine."""
        import deepspeed

        from rlhf_ray.models import ActorCritic, policy_parameter_names

        ds.init_distributed(master_addr, master_port, self.rank, self.world_size,
                            self.cfg.resources.call_timeout_s)
        conf = ds.ds_config(self.cfg, self.sizes)
        torch.manual_seed(self.cfg.seed)  # the value head starts identical on every rank
        m = self.cfg.model
        dtype = torch.bfloat16 if m.dtype == "bfloat16" else torch.float32
        with ds.zero3_loading(conf):
            model = ActorCritic.from_pretrained(
                m.path, value_head_init_std=m.value_head_init_std, value_grad_to_body=m.value_grad_to_body,
                separate_critic=m.separate_critic, critic_path=m.critic_path, torch_dtype=dtype)
        if m.gradient_checkpointing:
            model.policy.gradient_checkpointing_enable()
        optimizer = ds.build_optimizer(model, self.cfg.learner)
        scheduler = ds.lr_scheduler(optimizer, self.cfg.learner,
                                    self.cfg.ppo.iterations * self.sizes.optimizer_steps_per_iteration)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=conf)
        self.device = self.engine.device  # cuda:0 of the GPU Ray assigned, or cpu
        params = dict(self.engine.module.named_parameters())
        self.sync_params = [(params[inner], hf) for inner, hf in policy_parameter_names(self.engine.module)]
        n = sum(int(getattr(p, "ds_numel", p.numel())) for p in params.values())
        return {"rank": self.rank, "parameters": n, "zero_stage": self.cfg.learner.zero_stage}

    # ------------------------------------------------------------------ forward passes
    def _forward(self, mb: ExperienceBatch, entropy: str) -> _Forward:
        """Logprobs and values at the response positions only (the LM head skips the prompt).
        ``entropy``: "grad" (it is in the loss), "log" (detached, for metrics) or "none"."""
        R = mb.response_mask.shape[1]
        out = self.engine(mb.input_ids, mb.attention_mask.long(), mb.position_ids, response_len=R)
        temperature = self.cfg.rollout.temperature
        if entropy == "none":
            logprobs = logprobs_from_logits(out.logits, mb.response_ids, temperature)
            ent = None
        else:
            logprobs, ent = logprobs_and_entropy(out.logits, mb.response_ids, temperature,
                                                 entropy_grad=entropy == "grad")
        return _Forward(logprobs, out.values.float(), ent)

    @torch.no_grad()
    def compute_old(self, shard: ExperienceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Old logprobs and values (B, R) of this rank's slice at the current weights."""
        R = shard.response_mask.shape[1]
        logprobs = torch.zeros(len(shard), R)
        values = torch.zeros(len(shard), R)
        row = 0
        for mb in shard.chunks(self.cfg.learner.forward_batch_size):
            mb = mb.trim().to(self.device)
            f = self._forward(mb, entropy="none")
            r = f.logprobs.shape[1]
            logprobs[row: row + len(mb), :r] = (f.logprobs * mb.response_mask).cpu()
            values[row: row + len(mb), :r] = (f.values * mb.response_mask).cpu()
            row += len(mb)
        return logprobs, values

    # ------------------------------------------------------------------ PPO update
    def _step_token_counts(self, minis: list[ExperienceBatch]) -> torch.Tensor:
        counts = torch.tensor([float(m.num_response_tokens()) for m in minis], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(counts)
        return counts.cpu()

    def train(self, shard: ExperienceBatch, iteration: int) -> dict[str, float]:
        """One PPO update over this rank's slice; returns this rank's metrics."""
        p = self.cfg.ppo
        self.engine.train()
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + iteration * 31 + self.rank)
        sums: dict[str, torch.Tensor] = {}
        tokens = 0.0
        grad_norms: list[float] = []
        first_dev = None
        t0 = time.perf_counter()
        for _ in range(p.epochs):
            minis = shard.select(torch.randperm(len(shard), generator=gen)).split(p.mini_batches)
            counts = self._step_token_counts(minis)
            for mini, count in zip(minis, counts.tolist()):
                for micro in mini.split(self.sizes.grad_accum_steps):
                    micro = micro.trim().to(self.device)
                    stats, n_tok = self._micro_step(micro, count)
                    if first_dev is None:
                        first_dev = stats.pop("ratio_dev_max")
                    else:
                        stats.pop("ratio_dev_max")
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v * n_tok
                    tokens += n_tok
                norm = self.engine.get_global_grad_norm()
                if norm is not None:
                    grad_norms.append(float(norm))
        metrics = {k: float(v) / max(tokens, 1.0) for k, v in sums.items()}
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        metrics["onpolicy_ratio_dev"] = float(first_dev) if first_dev is not None else float("nan")
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["update_seconds"] = time.perf_counter() - t0
        return metrics

    def _micro_step(self, mb: ExperienceBatch, step_tokens: float) -> tuple[dict[str, torch.Tensor], float]:
        p = self.cfg.ppo
        mask = mb.response_mask
        f = self._forward(mb, entropy="grad" if p.entropy_coef > 0 else "log")
        pl = ppo_policy_loss(f.logprobs, mb.old_logprobs, mb.advantages, mask, p.clip_ratio,
                             clip_ratio_high=p.clip_ratio_high, dual_clip=p.dual_clip, num_tokens=step_tokens)
        vl = value_loss(f.values, mb.old_values, mb.returns, mask, clip_range=p.value_clip, num_tokens=step_tokens)
        entropy = masked_sum(f.entropy, mask) / step_tokens
        loss = pl.loss + p.vf_coef * vl.loss - p.entropy_coef * entropy
        # Undo DeepSpeed's mean over ranks; the step's token count already normalises.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self.engine.step()
        n_tok = float(mask.sum())
        with torch.no_grad():
            ratio_dev = ((f.logprobs - mb.old_logprobs).exp() - 1).abs().masked_fill(~mask, 0).max()
            local = max(n_tok, 1.0)
            stats = {
                "policy_loss": pl.loss.detach() * step_tokens / local,
                "value_loss": vl.loss.detach() * step_tokens / local,
                "clip_fraction": pl.clip_fraction,
                "value_clip_fraction": vl.clip_fraction,
                "policy_kl": pl.policy_kl,
                "entropy": masked_sum(f.entropy.detach(), mask) / local,
                "ratio_dev_max": ratio_dev,
            }
        return stats, n_tok

    # ------------------------------------------------------------------ weight sync
    def weight_specs(self) -> list[TensorSpec]:
        """The policy tensors (never the value head) under the engine's names."""
        return [TensorSpec(hf, ds.param_shape(p), dtype_name(p.dtype)) for p, hf in self.sync_params]

    def sync_address(self) -> tuple[str, int]:
        return self.node_ip(), free_port()

    def init_sync_group(self, master_addr: str, master_port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0 joins the broadcast group with the rollout engines as its group rank 0."""
        if self.rank == 0:
            self.sync_group = new_sync_group(master_addr, master_port, 0, world_size, ds.dist_backend(), timeout_s)

    def _bucket_params(self, bucket: Bucket) -> list[torch.nn.Parameter]:
        by_name = {hf: p for p, hf in self.sync_params}
        return [by_name[s.name] for s in bucket.specs]

    def _full_buckets(self, buckets: list[Bucket]) -> Iterator[list[torch.Tensor]]:
        """Each bucket's full tensors, yielded on rank 0 while they are gathered (ZeRO-3); the
        other ranks yield nothing but must drain it too, since gathering is collective."""
        for bucket in buckets:
            params = self._bucket_params(bucket)
            with ds.gathered(params, self.cfg.learner.zero_stage):
                if self.rank == 0:
                    yield [p.data for p in params]

    def broadcast_weights(self, buckets: list[Bucket]) -> dict[str, float]:
        """Collective transport: rank 0 broadcasts each bucket (every rank takes part in gathers)."""
        t0 = time.perf_counter()
        if self.rank == 0:
            sent = send_buckets(self.sync_group, self._full_buckets(buckets), self.cfg.sync.timeout_s)
        else:
            sent = 0
            for _ in self._full_buckets(buckets):
                pass
        return {"bytes": float(sent), "seconds": time.perf_counter() - t0}

    def export_arrays(self, buckets: list[Bucket]) -> list:
        """Object-store transport: rank 0 puts one flat array per bucket; returns the refs."""
        import ray

        return [ray.put(to_array(tensors)) for tensors in self._full_buckets(buckets)]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str, tokenizer_path: str | None = None) -> bool:
        """All ranks: DeepSpeed state (model, optimiser, scheduler; ZeRO shards) under
        ``path/learner``; rank 0 also writes the full actor-critic as a Hugging Face policy plus
        value head under ``path/policy`` when checkpoint.save_hf_policy is set."""
        ds.save_engine_state(self.engine, f"{path}/learner")
        if self.cfg.checkpoint.save_hf_policy:
            full = {}
            for name, p in self.engine.module.named_parameters():
                with ds.gathered([p], self.cfg.learner.zero_stage):
                    if self.rank == 0:
                        full[name] = p.data.detach().clone().cpu()
            if self.rank == 0:
                tokenizer = None
                if tokenizer_path:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
                self.engine.module.save_pretrained(f"{path}/policy", tokenizer=tokenizer, state_dict=full)
        dist.barrier()
        return True

    def load_checkpoint(self, path: str) -> bool:
        """All ranks: restore model, optimiser and scheduler state saved by ``save_checkpoint``."""
        ds.load_engine_state(self.engine, f"{path}/learner", self.rank)
        return True

    def policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full policy weights under HF names on rank 0 (None elsewhere); all ranks must call."""
        out = {}
        for p, hf in self.sync_params:
            with ds.gathered([p], self.cfg.learner.zero_stage):
                if self.rank == 0:
                    out[hf] = p.data.detach().clone().cpu()
        return out if self.rank == 0 else None

