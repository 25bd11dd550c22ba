"""The critic's settings checked together: the critic tools (``ppo.critic_warmup_iterations``,
``ppo.critic_epochs``) and where the critic starts (``model.value_init``). Part of the config's
validation (``validate.py``); standard library only."""

from __future__ import annotations

from rlhf_ray.config.schema import Config


def critic_tool_errors(cfg: Config) -> list[str]:
    """ppo.critic_warmup_iterations and ppo.critic_epochs: counts >= 0, a critic to train, a policy
    that is trained at all."""
    p, errors = cfg.ppo, []
    for name in ("critic_warmup_iterations", "critic_epochs"):
        n = getattr(p, name)
        if n < 0:
            errors.append(f"--ppo.{name} must be >= 0 (got {n}); 0 turns it off.")
        elif n > 0 and not p.uses_critic:
            errors.append(f"--ppo.{name} {n} trains the critic, but --ppo.estimator {p.estimator} trains no value "
                          "network (a critic-free estimator): unset it, or use --ppo.estimator gae.")
    if p.uses_critic and p.critic_warmup_iterations >= p.iterations > 0:
        errors.append(f"--ppo.critic_warmup_iterations {p.critic_warmup_iterations} with --ppo.iterations "
                      f"{p.iterations}: every iteration would warm the critic up and the policy would never be "
                      "trained. Keep the warm-up below --ppo.iterations (a few iterations is usual).")
    return errors


def reward_model_for_value(cfg: Config) -> str | None:
    """The reward model checkpoint the critic starts from (model.value_init reward_model), else None."""
    return cfg.reward.model_path if cfg.model.value_init == "reward_model" else None


def value_init_errors(cfg: Config) -> list[str]:
    """model.value_init reward_model needs a reward model and a critic (the checkpoints' hidden sizes
    and tokenizers are checked in the pre-flight, ``rlhf_ray.models.value_init.value_init_error``)."""
    m, errors = cfg.model, []
    if m.value_init != "reward_model":
        return errors
    if cfg.reward.kind != "model":
        errors.append(f"--model.value_init reward_model starts the critic from the reward model (--reward.model_path "
                      f"with --reward.kind model), but --reward.kind is {cfg.reward.kind!r}: there is no reward model "
                      "to start from. Use --model.value_init policy, or score with --reward.kind model.")
    if not cfg.ppo.uses_critic:
        errors.append(f"--model.value_init reward_model with --ppo.estimator {cfg.ppo.estimator}: a critic-free "
                      "estimator trains no value network; use --model.value_init policy or --ppo.estimator gae.")
    if m.separate_critic and m.critic_path:
        errors.append(f"--model.critic_path {m.critic_path} with --model.value_init reward_model: the separate critic "
                      "starts as the reward model (--reward.model_path); drop --model.critic_path, or use "
                      "--model.value_init policy to start the critic from it.")
    if m.value_head_init_std > 0:
        errors.append(f"--model.value_head_init_std {m.value_head_init_std} with --model.value_init reward_model: the "
                      "value head starts as the reward model's score head, so the random init would never be used; "
                      "set it to 0, or use --model.value_init policy.")
    return errors
