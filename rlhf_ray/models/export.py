"""Names and tensors of the policy part of an ActorCritic, as an inference engine wants them.

The policy is stored in ``ActorCritic.policy``, so its parameters are named
``policy.<hf name>`` inside the ActorCritic and ``<hf name>`` in an HF checkpoint and in
vLLM's ``load_weights`` (e.g. ``policy.model.layers.0.mlp.up_proj.weight`` ->
``model.layers.0.mlp.up_proj.weight``). The value head and a separate critic body are
never exported. Tied weights (e.g. a Qwen2 with ``tie_word_embeddings``) appear once,
under the name ``named_parameters`` reports first, which is also the name HF keeps
when it saves a tied checkpoint.

With LoRA adapters (``rlhf_ray.models.lora``) an adapted layer's weight is exported merged,
``W + (alpha / r) B A``, under the layer's HF name; the adapters themselves are not. An
:class:`ExportPlan` holds both kinds: plain parameters, and the merged layers. ``changed_only``
keeps what training can change (the merged layers, their fused siblings for vLLM and any other
trainable parameter): what a weight sync must send.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_ray.models.actor_critic import POLICY_PREFIX, ActorCritic
from rlhf_ray.models.lora import MergedParams, changed_module_paths, hf_name, merged_params


@dataclass(frozen=True)
class ExportPlan:
    """plain: (name in the ActorCritic, HF name) of parameters exported as they are, in module
    order; merged: HF name -> the parameters of an adapted layer's merged weight."""

    plain: list[tuple[str, str]]
    merged: dict[str, MergedParams]
    order: tuple[str, ...]  # every HF name of the plan, in module order
    complete: bool = True  # every (non-adapter) parameter is exported as it is: no merged layer, none left out

    def in_order(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """``tensors`` (keys ``prefix`` + HF name) re-ordered in module order (an empty dict stays empty)."""
        return {prefix + hf: tensors[prefix + hf] for hf in self.order if prefix + hf in tensors}


def export_plan(body: nn.Module, prefix: str, changed_only: bool = False) -> ExportPlan:
    """The export plan of ``body`` (the policy, or a separate critic body) whose parameters are
    ``prefix + name`` in the ActorCritic. Without adapters and with ``changed_only`` False this is
    every parameter under its own name."""
    merged = merged_params(body)
    keep_modules = changed_module_paths(list(merged)) if changed_only else set()
    plain, order = [], []
    left_out = False
    for name, p in body.named_parameters():  # remove_duplicate=True: tied weights once
        if ".lora_" in name:
            continue
        hf = hf_name(name)
        if hf in merged:
            order.append(hf)
            continue
        if changed_only and not (p.requires_grad or hf.rsplit(".", 1)[0] in keep_modules):
            left_out = True
            continue
        plain.append((prefix + name, hf))
        order.append(hf)
    return ExportPlan(plain, merged, tuple(order), complete=not merged and not left_out)


def policy_parameter_names(model: ActorCritic) -> list[tuple[str, str]]:
    """Pairs (name in ``model.named_parameters()``, HF/engine name), in module order, of the
    policy's parameters exported as they are (all of them without LoRA)."""
    return export_plan(model.policy, POLICY_PREFIX).plain


def policy_state_dict(model: ActorCritic) -> dict[str, torch.Tensor]:
    """HF name -> policy tensor (detached; shares storage except merged LoRA layers, which are new
    tensors). Single process only: under ZeRO-3 the parameters are partitions, gather them first."""
    plan = export_plan(model.policy, POLICY_PREFIX)
    params = dict(model.named_parameters())
    out = {hf: params[name].detach() for name, hf in plan.plain}
    out.update({hf: m.value() for hf, m in plan.merged.items()})
    return plan.in_order(out)
