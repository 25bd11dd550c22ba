"""Names and tensors of the policy part of an ActorCritic, as an inference engine wants them.

The policy is stored in ``ActorCritic.policy``, so its parameters are named
``policy.<hf name>`` inside the ActorCritic and ``<hf name>`` in an HF checkpoint and in
vLLM's ``load_weights`` (e.g. ``policy.model.layers.0.mlp.up_proj.weight`` ->
``model.layers.0.mlp.up_proj.weight``). The value head and a separate critic body are
never exported. Tied weights (e.g. a Qwen2 with ``tie_word_embeddings``) appear once,
under the name ``named_parameters`` reports first, which is also the name HF keeps
when it saves a tied checkpoint.
"""

from __future__ import annotations

import torch

from rlhf_ray.models.actor_critic import POLICY_PREFIX, ActorCritic


def policy_parameter_names(model: ActorCritic) -> list[tuple[str, str]]:
    """Pairs (name in ``model.named_parameters()``, HF/engine name), in module order."""
    pairs: list[tuple[str, str]] = []
    for name, _ in model.named_parameters():  # remove_duplicate=True: tied weights once
        if name.startswith(POLICY_PREFIX):
            pairs.append((name, name[len(POLICY_PREFIX):]))
    return pairs


def policy_state_dict(model: ActorCritic) -> dict[str, torch.Tensor]:
    """HF name -> detached parameter tensor (shares storage; no copy). Single process only:
    under ZeRO-3 the parameters are partitions, gather them first."""
    params = dict(model.named_parameters())
    return {hf_name: params[name].detach() for name, hf_name in policy_parameter_names(model)}
