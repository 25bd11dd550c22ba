"""The learner's checkpoints: DeepSpeed engine state, the value head outside the engine, and the
exported Hugging Face policy (LoRA layers merged, and the adapters alone in PEFT's format).

A mixin of :class:`rlhf_ray.workers.learner.Learner` (its ``engine``, ``head``, ``rank``, ``spec``
and, from ``WeightSender``, ``gather_export``), kept apart so the learner reads as set-up,
forward passes and the update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_ray.backends import deepspeed as ds
from rlhf_ray.models.actor_critic import CRITIC_PREFIX, POLICY_PREFIX, VALUE_HEAD_PREFIX
from rlhf_ray.models.lora import ADAPTER_SUBDIR, LoraSpec, adapter_state_dict, save_adapter

HEAD_STATE = "value_head_state.pt"  # the value head's weights, optimiser and schedule, beside the engine's


class CheckpointIO:
    """Save and load a learner rank's part of a checkpoint (every rank calls both)."""

    def save_checkpoint(self, path: str, tokenizer_path: str | None = None) -> bool:
        """All ranks: DeepSpeed state (model, optimiser, scheduler; ZeRO shards) under
        ``path/learner``; rank 0 also writes the full actor-critic as a Hugging Face policy plus
        value head under ``path/policy`` when checkpoint.save_hf_policy is set."""
        ds.save_engine_state(self.engine, f"{path}/learner")
        if self.rank == 0 and self.head is not None:
            torch.save(self.head.state_dict(), f"{path}/learner/{HEAD_STATE}")
        if self.spec.save_hf_policy:
            full = self._hf_state_dict()
            if self.rank == 0 and self.head is not None:
                full.update({f"{VALUE_HEAD_PREFIX}{k}": v.detach().clone().cpu()
                             for k, v in self.head.module.state_dict().items()})
            if self.rank == 0:
                tokenizer = None
                if tokenizer_path:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
                self.engine.module.save_pretrained(f"{path}/policy", tokenizer=tokenizer, state_dict=full)
            self._save_adapter(f"{path}/policy/{ADAPTER_SUBDIR}")
        dist.barrier()
        return True

    def _hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The ActorCritic's bodies as HF weights (LoRA layers merged) on rank 0; all ranks call."""
        from rlhf_ray.models.export import export_plan

        module, keep = self.engine.module, self.rank == 0
        full = self.gather_export(export_plan(module.policy, POLICY_PREFIX), keep, POLICY_PREFIX)
        if module.critic_body is not None:
            full.update(self.gather_export(export_plan(module.critic_body, CRITIC_PREFIX), keep, CRITIC_PREFIX))
        return full

    def _save_adapter(self, out_dir: str) -> None:
        """With LoRA: the policy's adapters alone in PEFT's format (all ranks call; rank 0 writes)."""
        spec = LoraSpec.of(self.spec.model.lora)
        if spec is None:
            return
        named = [(n, p) for n, p in self.engine.module.policy.named_parameters() if ".lora_" in n]
        full = ds.gather_full_state_dict(named, self.spec.learner.zero_stage, keep=self.rank == 0)
        if self.rank == 0:
            save_adapter(adapter_state_dict(full.items()), spec, out_dir, base_model=self.spec.model.path)

    def load_checkpoint(self, path: str) -> bool:
        """All ranks: restore model, optimiser and scheduler state saved by ``save_checkpoint``."""
        ds.load_engine_state(self.engine, f"{path}/learner", self.rank)
        if self.head is not None:
            self.head.load_state_dict(torch.load(f"{path}/learner/{HEAD_STATE}", map_location=self.device))
        return True
