"""The learner's checkpoints: the training engine's state, the value head outside the engine, and
the exported Hugging Face policy (LoRA layers merged, and the adapters alone in PEFT's format).

``LearnerCheckpoints`` is a collaborator of :class:`rlhf_ray.workers.learner.Learner`, built at
set-up from what it reads: the engine, the value head, the rank and the model section.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from rlhf_ray.backends.engine import TrainEngine, gather_full_state_dict
from rlhf_ray.backends.replicated import ReplicatedModule
from rlhf_ray.config import ModelConfig
from rlhf_ray.models.actor_critic import CRITIC_PREFIX, POLICY_PREFIX, VALUE_HEAD_PREFIX
from rlhf_ray.models.export import export_plan
from rlhf_ray.models.lora import ADAPTER_SUBDIR, LoraSpec, adapter_state_dict, save_adapter
from rlhf_ray.workers.learner_sync import gather_export

HEAD_STATE = "value_head_state.pt"  # the value head's weights, optimiser and schedule, beside the engine's


class LearnerCheckpoints:
    """Save and load a learner rank's part of a checkpoint (every rank calls both).

    Args:
        engine: the rank's training engine (its state goes under ``<path>/learner``).
        head: the value head trained beside the engine, or None without a critic.
        rank: this rank (rank 0 writes the files that are not sharded).
        model: the model section (path, LoRA settings).
        save_hf_policy: also write the full policy as a Hugging Face checkpoint (checkpoint.save_hf_policy).
    """

    def __init__(self, engine: TrainEngine, head: ReplicatedModule | None, rank: int, model: ModelConfig,
                 save_hf_policy: bool) -> None:
        self.engine, self.head, self.rank = engine, head, rank
        self.model, self.save_hf_policy = model, save_hf_policy

    def save(self, path: str, tokenizer_path: str | None = None) -> None:
        """All ranks: engine state (model, optimiser, scheduler; shards) under ``path/learner``;
        rank 0 also writes the full actor-critic as a Hugging Face policy plus value head under
        ``path/policy`` when checkpoint.save_hf_policy is set."""
        self.engine.save(f"{path}/learner")
        if self.rank == 0 and self.head is not None:
            os.makedirs(f"{path}/learner", exist_ok=True)
            torch.save(self.head.state_dict(), f"{path}/learner/{HEAD_STATE}")
        if self.save_hf_policy:
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

    def _hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The ActorCritic's bodies as HF weights (LoRA layers merged) on rank 0; all ranks call."""
        module, keep = self.engine.module, self.rank == 0
        full = gather_export(self.engine, export_plan(module.policy, POLICY_PREFIX), keep, POLICY_PREFIX)
        if module.critic_body is not None:
            full.update(gather_export(self.engine, export_plan(module.critic_body, CRITIC_PREFIX), keep, CRITIC_PREFIX))
        return full

    def _save_adapter(self, out_dir: str) -> None:
        """With LoRA: the policy's adapters alone in PEFT's format (all ranks call; rank 0 writes)."""
        spec = LoraSpec.of(self.model.lora)
        if spec is None:
            return
        named = [(n, p) for n, p in self.engine.module.policy.named_parameters() if ".lora_" in n]
        full = gather_full_state_dict(self.engine, named, keep=self.rank == 0)
        if self.rank == 0:
            save_adapter(adapter_state_dict(full.items()), spec, out_dir, base_model=self.model.path)

    def load(self, path: str) -> None:
        """All ranks: restore model, optimiser and scheduler state saved by ``save``."""
        self.engine.load(f"{path}/learner")
        if self.head is not None:
            self.head.load_state_dict(torch.load(f"{path}/learner/{HEAD_STATE}", map_location=self.engine.device))
