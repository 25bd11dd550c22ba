"""Multi-turn episodes' token budget (``rollout.env``): how many tokens one sample may hold after its
prompt, and its checks. Read by the validation, the memory plan and the episode runner; standard
library only."""

from __future__ import annotations

from rlhf_ray.config.schema import Config


def episode_tokens(cfg: Config) -> int:
    """Tokens after the prompt one sample may hold: rollout.max_new_tokens, or with rollout.env the
    episode's budget (rollout.max_episode_tokens, else what the engines' context holds after the
    longest prompt)."""
    r = cfg.rollout
    if r.env is None:
        return r.max_new_tokens
    return r.max_episode_tokens if r.max_episode_tokens is not None else r.max_model_len - cfg.data.max_prompt_tokens


def episode_errors(cfg: Config) -> list[str]:
    """Multi-turn settings: positive limits, and an episode that fits the engines' context."""
    r, errors = cfg.rollout, []
    if r.env is None:
        return errors
    if r.max_turns < 1:
        errors.append(f"--rollout.max_turns must be >= 1 (got {r.max_turns}).")
    if r.env_timeout_s <= 0 or r.env_workers < 1:
        errors.append(f"--rollout.env_timeout_s must be > 0 and --rollout.env_workers >= 1 (got {r.env_timeout_s} "
                      f"and {r.env_workers}).")
    if r.max_episode_tokens is not None and r.max_episode_tokens < 1:
        errors.append(f"--rollout.max_episode_tokens must be >= 1 (got {r.max_episode_tokens}).")
    need = cfg.data.max_prompt_tokens + episode_tokens(cfg)
    if episode_tokens(cfg) < r.max_new_tokens:
        errors.append(f"an episode must hold at least one turn of --rollout.max_new_tokens {r.max_new_tokens}, but "
                      f"its budget is {episode_tokens(cfg)} tokens (--rollout.max_episode_tokens, else "
                      "--rollout.max_model_len - --data.max_prompt_tokens); raise it.")
    elif need > r.max_model_len:
        errors.append(f"--rollout.max_model_len {r.max_model_len} cannot hold --data.max_prompt_tokens "
                      f"{cfg.data.max_prompt_tokens} + an episode of --rollout.max_episode_tokens "
                      f"{episode_tokens(cfg)}; raise it to at least {need} or lower the episode budget.")
    return errors
