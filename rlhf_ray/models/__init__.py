"""Models: float32 value head, shared-body actor-critic, export of policy weights."""

from rlhf_ray.models.actor_critic import (
    ActorCritic,
    ActorCriticOutput,
    causal_lm_logits_at,
    disable_dropout,
    load_value_head,
    positions_from_mask,
    response_positions,
    save_value_head,
)
from rlhf_ray.models.export import policy_parameter_names, policy_state_dict
from rlhf_ray.models.value_head import ValueHead

__all__ = [
    "ActorCritic",
    "ActorCriticOutput",
    "ValueHead",
    "causal_lm_logits_at",
    "disable_dropout",
    "load_value_head",
    "policy_parameter_names",
    "policy_state_dict",
    "positions_from_mask",
    "response_positions",
    "save_value_head",
]
