"""Supervised trainer roles: one data-parallel rank of SFT or reward-model training on the
training engine learner.backend names (``rlhf_ray.backends.engine.TrainEngine``).

``SupervisedTrainer`` holds everything the two share (joining the group, building the engine
around the model, sharded as it loads where the engine does so, the epoch loop with gradient
accumulation, evaluation in lock-step, saving a Hugging Face checkpoint). A subclass adds only
its model class and its loss: ``SFTTrainer`` (``AutoModelForCausalLM``, loss on response tokens)
and ``RewardModelTrainer`` (``AutoModelForSequenceClassification`` with one label, pairwise loss).

Every rank receives the whole (small, tokenised) data set once and takes its own slice of each
optimiser step from a permutation all ranks compute alike, so no data moves per step.

Loss normalisation, as in the PPO learner: a loss is a sum over units (target tokens or pairs)
divided by the unit count of the whole optimiser step over all ranks (one all-reduce per epoch);
the engine's ``backward`` makes the gradient the sum over ranks and micro-batches, i.e. the
full-batch gradient however the batch is split.

Plain classes, importable without Ray; their Ray shells are ``SFTTrainerActor`` and
``RewardModelTrainerActor`` in ``rlhf_ray/supervised/actors.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist

from rlhf_ray.algorithms.pairwise import pairwise_loss, sft_loss
from rlhf_ray.backends.engine import EngineSettings, TrainEngine, gather_full_state_dict, train_backend
from rlhf_ray.batch import plan_passes
from rlhf_ray.checkpoint_files import checkpoint_path, publish
from rlhf_ray.data.prompts import pad_token_id
from rlhf_ray.models.reward_head import pooled_scores, score_head
from rlhf_ray.supervised.config import TrainerRunConfig, resolve_trainer
from rlhf_ray.supervised.data import PairBatch, SFTBatch
from rlhf_ray.weight_sync.transport import serve_rendezvous
from rlhf_ray.workers.base import RoleBase


class SupervisedTrainer(RoleBase):
    """One data-parallel rank. Subclasses set ``metric_keys`` and implement ``_load_model``,
    ``_units`` and ``_loss``."""

    role = "trainer"
    metric_keys: tuple[str, ...] = ()  # sums returned by ``_loss`` besides "units"

    def __init__(self, cfg: TrainerRunConfig, rank: int, world_size: int) -> None:
        super().__init__(rank, cfg.resources.threads)
        self.cfg = cfg  # the SFT/RM run's own tree (supervised/config.py)
        self.rank, self.world_size = rank, world_size
        self.sizes = resolve_trainer(cfg)
        self.engine: TrainEngine | None = None
        self.device = torch.device("cpu")
        self.train_set = self.eval_set = None
        self.global_step = 0

    # ------------------------------------------------------------------ set-up
    def master_address(self, loopback: bool = False) -> tuple[str, int]:
        """Where the group (rank 0) listens; call on rank 0 before ``setup``. The rendezvous store
        starts here, on 127.0.0.1 when ``loopback`` (every rank on this machine) or else on this
        node's address only, at a port held from now on (``serve_rendezvous``)."""
        host = "127.0.0.1" if loopback else self.node_ip()
        host, port, self._master_store = serve_rendezvous(host, self.cfg.train.call_timeout_s)
        return host, port

    def setup(self, master_addr: str, master_port: int, total_steps: int) -> dict:
        """Join the group, load the model (sharded as it loads where the engine does so) and
        build the engine; the learning-rate schedule spans ``total_steps`` optimiser steps."""
        m, lrn = self.cfg.model, self.cfg.learner
        backend = train_backend(lrn.backend)
        backend.join_group(master_addr, master_port, self.rank, self.world_size, self.cfg.train.call_timeout_s)
        torch.manual_seed(self.cfg.seed)  # a newly initialised head starts identical on every rank
        dtype = torch.bfloat16 if m.dtype == "bfloat16" else torch.float32

        def load() -> torch.nn.Module:
            model = self._load_model(m.path, dtype)
            if m.gradient_checkpointing:
                model.gradient_checkpointing_enable()
            return model

        self.engine = backend.build(load, EngineSettings(lrn, m.dtype, self.sizes.grad_accum_steps, total_steps))
        self.device = self.engine.device  # cuda:0 of the GPU Ray assigned, or cpu
        n = sum(math.prod(self.engine.full_shape(p)) for p in self.engine.module.parameters())
        return {"rank": self.rank, "parameters": n, "backend": lrn.backend, "zero_stage": lrn.zero_stage}

    def set_data(self, train, eval_set) -> int:
        """Keep the tokenised train and eval sets (every rank gets all; it slices its own part)."""
        self.train_set, self.eval_set = train, eval_set
        return len(train)

    # ------------------------------------------------------------------ subclass hooks
    def _load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        raise NotImplementedError

    def _units(self, batch) -> int:
        """What the loss is normalised by: target tokens (SFT) or pairs (RM)."""
        raise NotImplementedError

    def _loss(self, batch, num_units: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over ``batch``'s units / ``num_units``, detached metric SUMS over its units)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def _step_slices(self, epoch: int, start_step: int = 0) -> list:
        """This rank's part of each optimiser step of ``epoch`` from ``start_step`` on (the same plan
        on every rank, and the same as when the epoch started: a resumed epoch continues it)."""
        n, b, per = len(self.train_set), self.cfg.train.batch_size, self.sizes.per_rank_batch
        if self.cfg.train.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
        else:
            order = torch.arange(n)
        steps = n // b
        if self.cfg.train.max_steps:
            steps = max(0, min(steps, self.cfg.train.max_steps - (self.global_step - start_step)))
        return [self.train_set.select(order[s * b + self.rank * per: s * b + (self.rank + 1) * per])
                for s in range(start_step, steps)]

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors
        dist.all_reduce(t)
        return t.cpu().tolist()

    def train_epoch(self, epoch: int, start_step: int = 0) -> dict[str, float]:
        """One pass over the training set (from step ``start_step`` of the epoch when resuming);
        returns metrics over all ranks (same on every rank) of the steps run. With
        train.checkpoint_every, saves a checkpoint every that many steps and at the epoch's end."""
        self.engine.train()
        t0 = time.perf_counter()
        steps = self._step_slices(epoch, start_step)
        every = self.cfg.train.checkpoint_every
        first_step = self.global_step
        counts = self._all_reduce([float(self._units(s)) for s in steps]) if steps else []
        sums: dict[str, torch.Tensor] = {}  # detached tensors until the end: no host sync per micro-batch
        first_loss = torch.zeros((), dtype=torch.float64)
        mb = self.cfg.learner.micro_batch_size
        for done, (step, count) in enumerate(zip(steps, counts), start=1):
            step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
            parts = plan_passes(len(step), max_rows=mb)
            for j, rows in enumerate(parts):
                micro = step.select(rows).trim().to(self.device)
                loss, stats = self._loss(micro, count)
                self.engine.backward(loss, last=j == len(parts) - 1)
                step_loss += loss.detach()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
            self.engine.step()
            if self.global_step == first_step:
                first_loss = step_loss
            self.global_step += 1
            if every and (self.global_step % every == 0 or done == len(steps)):
                self.save_state(epoch, start_step + done)
        keys = ["units", *self.metric_keys]
        totals = self._all_reduce([float(sums.get(k, 0.0)) for k in keys] + [float(first_loss)])
        units = totals[0]
        out = {f"train/{k}": v / max(units, 1.0) for k, v in zip(keys[1:], totals[1:-1])}
        out.update({"train/first_step_loss": totals[-1] if steps else math.nan, "train/steps": float(len(steps)),
                    "train/units": units, "step": float(self.global_step),
                    "lr": self.engine.lr(), "train/seconds": time.perf_counter() - t0})
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics on the held-out set over all ranks. Every rank runs the same number of forward
        passes (a short rank repeats a row and ignores it): ZeRO-3 gathers are collective."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        self.engine.eval()
        mine = self.eval_set.select(range(self.rank, len(self.eval_set), self.world_size))
        longest = -(-len(self.eval_set) // self.world_size)  # rows of the ranks that hold the most
        fb = self.cfg.learner.forward_batch_size
        sums: dict[str, torch.Tensor] = {}
        for rows in plan_passes(len(mine), max_rows=fb, passes=-(-longest // fb)):
            if rows is not None:
                chunk = mine.select(rows).trim().to(self.device)
                _, stats = self._loss(chunk, float(max(self._units(chunk), 1)))
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
            else:
                self._loss(self.eval_set.select([0]).trim().to(self.device), 1.0)
        keys = ["units", *self.metric_keys]
        totals = dict(zip(keys, self._all_reduce([float(sums.get(k, 0.0)) for k in keys])))
        self.engine.train()
        return {f"eval/{k}": totals[k] / max(totals["units"], 1.0) for k in keys if k != "units"}

    # ------------------------------------------------------------------ trainer checkpoints
    def save_state(self, epoch: int, next_step: int) -> str:
        """All ranks: engine state (model, optimiser, scheduler; shards) and the position in
        the data (``next_step`` of ``epoch``) as ``<output_dir>/checkpoints/step_<global step>``,
        written under ``.tmp`` and published by rank 0 once every rank has written."""
        final = checkpoint_path(self.cfg.train.output_dir, self.global_step, prefix="step")
        tmp = final + ".tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        self.engine.save(tmp)
        dist.barrier()
        if self.rank == 0:
            position = {"epoch": epoch, "next_step": next_step, "global_step": self.global_step,
                        "world_size": self.world_size, "backend": self.cfg.learner.backend,
                        "batch_size": self.cfg.train.batch_size,
                        "seed": self.cfg.seed, "shuffle": self.cfg.train.shuffle}
            with open(os.path.join(tmp, "position.json"), "w") as fh:
                json.dump(position, fh, indent=2)
            publish(tmp, final, f"step {self.global_step}", self.cfg.train.checkpoint_keep_last, prefix="step")
        dist.barrier()
        return final

    def load_state(self, path: str, position: dict) -> int:
        """All ranks: restore what ``save_state`` wrote; returns the global step."""
        self.engine.load(path)
        self.global_step = int(position["global_step"])
        return self.global_step

    # ------------------------------------------------------------------ saving
    def save(self, out_dir: str, tokenizer_path: str) -> bool:
        """Write a standard Hugging Face checkpoint (config, safetensors, tokenizer) to ``out_dir``.
        All ranks must call (a sharding engine gathers each parameter); rank 0 writes."""
        module = self.engine.module
        full = gather_full_state_dict(self.engine, module.named_parameters(), keep=self.rank == 0)
        if self.rank == 0:
            persistent = set(module.state_dict().keys())
            full.update({n: b.detach().clone().cpu() for n, b in module.named_buffers() if n in persistent})
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
            if tokenizer.pad_token_id is None:  # the reward actor pads batches with it
                tokenizer.pad_token = tokenizer.eos_token
            module.save_pretrained(out_dir, state_dict=full)
            tokenizer.save_pretrained(out_dir)
        dist.barrier()
        return True


class SFTTrainer(SupervisedTrainer):
    """Supervised fine-tuning of a causal LM: next-token NLL on response tokens only."""

    role = "sft"
    metric_keys = ("loss", "token_accuracy")

    def _load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    def _units(self, batch: SFTBatch) -> int:
        return batch.num_target_tokens()

    def _loss(self, batch: SFTBatch, num_units: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long())
        # Position t predicts token t + 1: targets are the response tokens from position 1 on.
        mask = batch.loss_mask[:, 1:]
        res = sft_loss(out.logits[:, :-1], batch.input_ids[:, 1:], mask, num_tokens=num_units)
        n = mask.sum()
        return res.loss, {"units": n, "loss": res.loss.detach() * num_units, "token_accuracy": res.token_accuracy * n}


def unexpected_load_keys(info: dict) -> dict[str, list[str]]:
    """The part of a sequence-classification load report that is not the expected "score head new,
    LM head unused" of a causal-LM start: {kind: keys} for missing/unexpected/mismatched keys."""
    expected = {"missing_keys": "score.", "unexpected_keys": "lm_head."}
    out = {}
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [str(k) for k in info.get(kind, []) if not (kind in expected and str(k).startswith(expected[kind]))]
        if keys:
            out[kind] = sorted(keys)
    return out


class RewardModelTrainer(SupervisedTrainer):
    """Bradley-Terry reward model: a sequence-classification head with one label, read at each
    sequence's last token (``models/reward_head.py``, as the PPO reward role reads it), pairwise loss."""

    role = "rm"
    metric_keys = ("loss", "accuracy", "reward_chosen", "reward_rejected", "reward_gap")

    def _load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        # The id the driver padded the data with (the same tokenizer's). The reward is read at each
        # row's last attended token (``pooled_scores``), never found by this id: with pad = EOS a
        # finished response's EOS would pass for padding.
        self.pad_id = pad_token_id(AutoTokenizer.from_pretrained(path))
        # From a causal LM checkpoint the score head is new (randomly initialised, seeded) and the LM
        # head is left out: transformers' load report says so at length, so it is read here instead
        # and only a mismatch beyond those two is shown.
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                             output_loading_info=True)
        finally:
            hf_logging.set_verbosity(level)
        odd = unexpected_load_keys(info)
        if odd and self.rank == 0:
            print(f"rm: loading {path} as a reward model left these weights out or new beyond the score head and "
                  f"the LM head: {odd}", flush=True)
        model.config.pad_token_id = self.pad_id  # transformers refuses a batch of several rows without one
        self.head = score_head(model)
        return model

    def _units(self, batch: PairBatch) -> int:
        return len(batch)

    def _loss(self, batch: PairBatch, num_units: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, mask = batch.stacked(self.pad_id)
        rewards = pooled_scores(self.engine, self.head, ids, mask)[:, 0].float()
        n = len(batch)
        r_c, r_r = rewards[:n], rewards[n:]
        res = pairwise_loss(r_c, r_r, batch.margin, num_pairs=num_units, center_coef=self.cfg.center_rewards_coef)
        with torch.no_grad():
            stats = {"units": torch.tensor(float(n), device=rewards.device), "loss": res.loss.detach() * num_units,
                     "accuracy": res.accuracy * n, "reward_chosen": r_c.sum(), "reward_rejected": r_r.sum(),
                     "reward_gap": (r_c - r_r).sum()}
        return res.loss, stats

