"""The asynchronous pipeline's settings (``rollout.max_staleness``, ``rollout.partial_rollout_tokens``):
their checks. Standard library only."""

from __future__ import annotations

from rlhf_ray.config.schema import Config


def staleness_errors(cfg: Config) -> list[str]:
    """A bound that is not negative and agrees with rollout.async_generation; partial rollouts only
    where they split something and lose nothing."""
    r, errors = cfg.rollout, []
    if r.max_staleness is not None and r.max_staleness < 0:
        errors.append(f"--rollout.max_staleness must be >= 0 (got {r.max_staleness}): 0 trains on-policy, k >= 1 "
                      "lets a token lag the trained policy by k versions at most.")
    if r.async_generation and r.max_staleness == 0:
        errors.append("--rollout.async_generation asks for one step off-policy but --rollout.max_staleness is 0 "
                      "(on-policy); drop --rollout.async_generation (max_staleness says it all).")
    n = r.partial_rollout_tokens
    if n < 0:
        errors.append(f"--rollout.partial_rollout_tokens must be >= 0 (got {n}); 0 generates whole responses.")
    elif n > 0:
        if r.staleness == 0:
            errors.append(f"--rollout.partial_rollout_tokens {n} does nothing on-policy (--rollout.max_staleness 0: "
                          "no weight sync comes while a batch generates); set --rollout.max_staleness >= 1 or "
                          "leave it 0.")
        if n >= r.max_new_tokens:
            errors.append(f"--rollout.partial_rollout_tokens {n} splits nothing: a response has at most "
                          f"--rollout.max_new_tokens {r.max_new_tokens} tokens; use fewer, or 0.")
        if r.env is not None:
            errors.append("--rollout.partial_rollout_tokens with --rollout.env: an episode already comes back "
                          "after every turn, and a weight sync lands between its turns; leave it 0.")
        if r.stop:
            errors.append("--rollout.partial_rollout_tokens with --rollout.stop: a stop string split over two "
                          "segments would not be seen; use one of them.")
    return errors
