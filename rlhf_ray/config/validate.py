"""Whole-config validation of a PPO run, before Ray starts.

:func:`validate` collects every problem into one ConfigError; each line names the flag and
how to fix it. The PPO rules catch first what the math would reject at run time, inside a
learner or the coordinator (``rlhf_ray.algorithms``: ``clipped_surrogate``'s clip checks,
``value_loss``'s clip range, the KL controllers, ``clip_scores``) or what torch's optimisers and
vLLM's sampling parameters would reject there.

Standard library only.
"""

from __future__ import annotations

from typing import Any

from rlhf_ray.config.choices import choice_errors
from rlhf_ray.config.critic import critic_tool_errors, value_init_errors
from rlhf_ray.config.episodes import episode_errors
from rlhf_ray.config.staleness import staleness_errors
from rlhf_ray.config.schema import Config, ConfigError, LearnerConfig, RoleResources, get_path
from rlhf_ray.config.sizes import Sizes, resolve

_POSITIVE = [
    "rollout.num_engines", "rollout.prompts_per_iteration", "rollout.samples_per_prompt",
    "rollout.max_new_tokens", "rollout.temperature", "rollout.max_model_len", "rollout.tensor_parallel_size",
    "ppo.iterations", "ppo.epochs", "ppo.mini_batches", "learner.num_ranks",
    "learner.micro_batch_size", "learner.forward_batch_size", "learner.lr", "learner.logprob_chunk",
    "reward.micro_batch_size", "reference.micro_batch_size", "reward.replicas", "reference.replicas",
    "reward.concurrency", "data.max_prompt_tokens",
    "sync.bucket_mb", "sync.timeout_s", "resources.call_timeout_s", "resources.startup_timeout_s", "ppo.kl_horizon",
    "checkpoint.keep_last", "ppo.max_bad_iterations", "logging.log_every",
]

# Weights and regularisers where a negative value turns the term around; 0 switches it off.
_NON_NEGATIVE = {
    "ppo.vf_coef": "a negative weight trains the critic away from the returns",
    "ppo.entropy_coef": "0 disables the entropy bonus; a negative one would push the entropy down",
    "ppo.kl_coef": "0 disables the KL penalty; a negative one would reward drifting from the reference",
    "model.value_head_init_std": "0 gives a zero-initialised value head",
}


def validate(cfg: Config) -> Sizes:
    """Check the whole config; raise one ConfigError listing every problem. Returns the sizes."""
    errors = [*_basic_errors(cfg), *_ppo_errors(cfg), *_learner_errors(cfg), *_rollout_errors(cfg),
              *_reward_errors(cfg), *_eval_errors(cfg), *_resource_errors(cfg), *lora_errors(cfg),
              *value_init_errors(cfg)]
    try:
        sizes = resolve(cfg)
    except ConfigError as exc:
        errors.append(str(exc))
        sizes = None
    raise_if_any(errors)
    assert sizes is not None
    return sizes


# --------------------------------------------------------------------------- shared by every config root


def raise_if_any(errors: list[str]) -> None:
    """One ConfigError listing every problem, if there is any."""
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def field_errors(cfg: Any, positive: list[str], non_negative: dict[str, str] | None = None) -> list[str]:
    """Fields of the tree ``cfg`` outside the options of their ``Literal`` annotation (every choice
    field, :mod:`rlhf_ray.config.choices`), and the dotted keys not > 0 or below 0 (with why)."""
    errors = choice_errors(cfg)
    for key in positive:
        if not get_path(cfg, key) > 0:
            errors.append(f"--{key} must be > 0 (got {get_path(cfg, key)!r}).")
    for key, why in (non_negative or {}).items():
        if get_path(cfg, key) < 0:
            errors.append(f"--{key} must be >= 0 (got {get_path(cfg, key)!r}); {why}.")
    return errors


def optimizer_errors(lrn: LearnerConfig) -> list[str]:
    """The learner section's optimiser and schedule settings (PPO learner and SFT/RM trainers)."""
    errors = []
    if lrn.backend == "fsdp2" and lrn.zero_stage < 2:
        errors.append(f"--learner.zero_stage {lrn.zero_stage} has no FSDP2 equivalent: fsdp2 always shards "
                      "parameters, gradients and optimiser state. Use --learner.zero_stage 2 (parameters kept "
                      "gathered from forward to backward) or 3 (least memory), or --learner.backend deepspeed.")
    if lrn.max_grad_norm < 0:
        errors.append(f"--learner.max_grad_norm must be >= 0 (got {lrn.max_grad_norm}); 0 disables gradient clipping.")
    if lrn.weight_decay < 0:
        errors.append(f"--learner.weight_decay must be >= 0 (got {lrn.weight_decay}); 0 disables weight decay.")
    if lrn.warmup_steps < 0 or not 0 <= lrn.min_lr_ratio <= 1:
        errors.append("--learner.warmup_steps must be >= 0 and --learner.min_lr_ratio in [0, 1].")
    if not all(0 <= beta < 1 for beta in lrn.adam_betas):
        errors.append(f"--learner.adam_betas must both be in [0, 1) (got {list(lrn.adam_betas)}); e.g. [0.9, 0.95].")
    return errors


def resource_errors(res: RoleResources, flag: str) -> list[str]:
    if res.num_cpus < 0 or res.num_gpus < 0 or res.threads < 1:
        return [f"--{flag}: num_cpus/num_gpus must be >= 0 and threads >= 1."]
    return []


# --------------------------------------------------------------------------- the PPO run's sections


def _basic_errors(cfg: Config) -> list[str]:
    """Choices, strictly positive counts, and non-negative weights."""
    return field_errors(cfg, _POSITIVE, _NON_NEGATIVE)


def _ppo_errors(cfg: Config) -> list[str]:
    """What clipped_surrogate, value_loss, compute_gae and the KL controllers would reject mid-run."""
    p, errors = cfg.ppo, []
    if not 0 < p.clip_ratio <= 1:
        errors.append(f"--ppo.clip_ratio must be in (0, 1] (got {p.clip_ratio}): the ratio is clipped to "
                      "[1 - clip_ratio, 1 + clip_ratio], and 0.1 to 0.3 is usual.")
    if p.clip_ratio_high is not None and p.clip_ratio_high <= 0:
        errors.append(f"--ppo.clip_ratio_high must be > 0 (got {p.clip_ratio_high}); unset it to clip the "
                      "upper side with --ppo.clip_ratio too.")
    if p.dual_clip is not None and p.dual_clip <= 1:
        errors.append(f"--ppo.dual_clip must be > 1 (got {p.dual_clip}); unset it to disable.")
    if p.value_clip is not None and p.value_clip <= 0:
        errors.append(f"--ppo.value_clip must be > 0 (got {p.value_clip}); unset it (null) to disable value clipping.")
    if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
        errors.append("--ppo.gamma and --ppo.lam must be in [0, 1].")
    if p.lam_critic is not None and not 0 <= p.lam_critic <= 1:
        errors.append(f"--ppo.lam_critic must be in [0, 1] (got {p.lam_critic}); unset it to use --ppo.lam.")
    if p.lam_adaptive_alpha is not None and not p.lam_adaptive_alpha > 0:
        errors.append(f"--ppo.lam_adaptive_alpha must be > 0 (got {p.lam_adaptive_alpha}); VAPO uses 0.05.")
    for name in ("lam_critic", "lam_adaptive_alpha"):
        if getattr(p, name) is not None and p.estimator != "gae":
            errors.append(f"--ppo.{name} shapes GAE's lambdas, but --ppo.estimator is {p.estimator!r}, which "
                          f"uses no critic and no lambda: unset it, or use --ppo.estimator gae.")
    if p.kl_target is not None and p.kl_target <= 0:
        errors.append("--ppo.kl_target must be > 0, or unset for a fixed coefficient.")
    elif p.kl_target is not None and p.kl_coef == 0:
        errors.append(f"--ppo.kl_coef 0 with --ppo.kl_target {p.kl_target}: the adaptive controller multiplies the "
                      "coefficient, so it can never leave 0; start --ppo.kl_coef above 0 (e.g. 0.02) or unset "
                      "--ppo.kl_target for no KL penalty.")
    return errors + critic_tool_errors(cfg) + _family_errors(cfg)


def _family_errors(cfg: Config) -> list[str]:
    """Estimators, KL placement, off-policy correction and DAPO's pieces."""
    p, r, errors = cfg.ppo, cfg.rollout, []
    if p.kl_in == "reward" and p.kl_estimator != "k1":
        errors.append(f"--ppo.kl_estimator {p.kl_estimator} with --ppo.kl_in reward: only k1 is an unbiased "
                      "per-token reward (k2 and k3 estimate KL for a loss term; as rewards they bias the return). "
                      "Set --ppo.kl_in loss to use it as a loss term, or --ppo.kl_estimator k1.")
    if p.kl_in == "loss" and p.kl_estimator == "k1":
        errors.append("--ppo.kl_estimator k1 with --ppo.kl_in loss: as a loss term k1's gradient is grad log pi, "
                      "whose expectation over the policy's own samples is zero, so the term adds noise and no pull "
                      "toward the reference. Use --ppo.kl_estimator k3 (what auto, the default, picks with "
                      "--ppo.kl_in loss) or k2, or put k1 in the reward with --ppo.kl_in reward.")
    if p.ratio == "sequence" and p.loss_agg != "seq_mean_token_mean":
        errors.append(f"--ppo.ratio sequence with --ppo.loss_agg {p.loss_agg}: GSPO averages one clipped term per "
                      f"sequence, while {p.loss_agg} weights each sequence by its length. Use --ppo.loss_agg "
                      "seq_mean_token_mean (what auto, the default, picks with --ppo.ratio sequence), or "
                      "--ppo.ratio token.")
    if r.samples_per_prompt < 2 and p.uses_groups:
        what = "--ppo.dynamic_sampling" if p.dynamic_sampling else f"--ppo.estimator {p.estimator}"
        errors.append(f"{what} compares the samples of one prompt: --rollout.samples_per_prompt must be >= 2 "
                      f"(got {r.samples_per_prompt}).")
    if not p.uses_critic and cfg.model.separate_critic:
        errors.append(f"--model.separate_critic with --ppo.estimator {p.estimator}: a critic-free estimator "
                      "trains no value network; unset --model.separate_critic or use --ppo.estimator gae.")
    if p.correction_cap <= 0 or not 0 <= p.correction_low < 1 < p.correction_high:
        errors.append("--ppo.correction_cap must be > 0 and --ppo.correction_low < 1 < --ppo.correction_high "
                      f"(got {p.correction_cap}, {p.correction_low}, {p.correction_high}).")
    if p.max_extra_generations < 0:
        errors.append(f"--ppo.max_extra_generations must be >= 0 (got {p.max_extra_generations}).")
    if not 0 <= p.overlong_buffer <= r.max_new_tokens:
        errors.append(f"--ppo.overlong_buffer must be in [0, --rollout.max_new_tokens {r.max_new_tokens}] "
                      f"(got {p.overlong_buffer}); 0 turns the overlong penalty off.")
    if p.overlong_penalty < 0:
        errors.append(f"--ppo.overlong_penalty must be >= 0 (got {p.overlong_penalty}).")
    if r.top_p < 1 or r.top_k > 0:
        errors.append(f"--rollout.top_p {r.top_p} / --rollout.top_k {r.top_k}: the engines would sample from the "
                      "truncated distribution while the learner and the reference score the full softmax, so the "
                      "PPO ratio and the KL would be silently wrong. Use top_p 1 and top_k -1 (temperature is "
                      "handled exactly).")
    return errors


def _learner_errors(cfg: Config) -> list[str]:
    lrn, errors = cfg.learner, []
    if lrn.micro_batch_tokens < 0 or lrn.forward_max_tokens < 0:
        errors.append("--learner.micro_batch_tokens and --learner.forward_max_tokens must be >= 0 "
                      "(0 sizes passes by sequences: learner.micro_batch_size / learner.forward_batch_size).")
    if lrn.value_head_lr is not None and lrn.value_head_lr <= 0:
        errors.append(f"--learner.value_head_lr must be > 0 (got {lrn.value_head_lr}); unset it to use --learner.lr.")
    return errors + optimizer_errors(lrn)


def _rollout_errors(cfg: Config) -> list[str]:
    """Sampling settings an engine would refuse, the context length, tensor parallelism with the
    sync transport, the engine-vs-learner logprob check, and the backend's own subsection."""
    r, errors = cfg.rollout, []
    if not 0 < r.top_p <= 1:
        errors.append(f"--rollout.top_p must be in (0, 1] (got {r.top_p}).")
    if r.top_k == 0 or r.top_k < -1:
        errors.append(f"--rollout.top_k must be -1 (top-k off) or >= 1 (got {r.top_k}).")
    if r.backend == "vllm":  # the subsection of a backend that is not picked is never read
        errors += _vllm_errors(cfg)
    need = cfg.data.max_prompt_tokens + r.max_new_tokens
    if need > r.max_model_len:
        errors.append(
            f"--rollout.max_model_len {r.max_model_len} cannot hold --data.max_prompt_tokens "
            f"{cfg.data.max_prompt_tokens} + --rollout.max_new_tokens {r.max_new_tokens}; "
            f"raise it to at least {need} or shorten prompts/responses.")
    errors += episode_errors(cfg)
    errors += staleness_errors(cfg)
    if r.tensor_parallel_size > 1 and cfg.sync.transport == "collective":
        errors.append(f"--rollout.tensor_parallel_size {r.tensor_parallel_size} with --sync.transport collective: "
                      "every tensor-parallel worker of an engine would join the broadcast group with the engine's "
                      "one rank, so two processes claim one rank and the sync fails or hangs. Use --sync.transport "
                      "object_store (each worker of the engine gets the full weights and loads its own shard), or "
                      "--rollout.tensor_parallel_size 1.")
    if cfg.sync.check_logprobs_every < 0:
        errors.append(f"--sync.check_logprobs_every must be >= 0 (got {cfg.sync.check_logprobs_every}); "
                      "0 never checks, 1 checks every iteration.")
    limit = cfg.sync.max_logprob_mismatch
    if limit is not None and limit < 0:
        errors.append(f"--sync.max_logprob_mismatch must be >= 0 (got {limit}): a mean |difference| is never "
                      "negative, so every check would fail; unset it to only report.")
    return errors


def _vllm_errors(cfg: Config) -> list[str]:
    v, errors = cfg.rollout.vllm, []
    if not 0 < v.gpu_memory_utilization <= 1:
        errors.append(f"--rollout.vllm.gpu_memory_utilization must be in (0, 1] (got {v.gpu_memory_utilization}): "
                      "it is the fraction of GPU memory vLLM may take.")
    if v.kv_cache_gib < 1 or not float(v.kv_cache_gib).is_integer():
        errors.append(f"--rollout.vllm.kv_cache_gib must be a whole number >= 1 (got {v.kv_cache_gib}): vLLM's CPU "
                      "build reads its KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE) and refuses to start "
                      "without one; e.g. 1.")
    return errors


def _reward_errors(cfg: Config) -> list[str]:
    rw, errors = cfg.reward, []
    if rw.kind == "function" and not rw.function:
        errors.append("--reward.kind function needs --reward.function path/to/file.py:name.")
    if rw.kind == "http" and not (rw.url or "").startswith(("http://", "https://")):
        errors.append("--reward.kind http needs --reward.url http://host:port/score.")
    if rw.http_retries < 0:
        errors.append("--reward.http_retries must be >= 0.")
    if rw.http_backoff_s < 0:
        errors.append(f"--reward.http_backoff_s must be >= 0 (got {rw.http_backoff_s}); 0 retries at once.")
    if rw.samples_per_call < 0:
        errors.append(f"--reward.samples_per_call must be >= 0 (got {rw.samples_per_call}); 0 cuts each replica's "
                      "part of the batch into --reward.concurrency calls.")
    if rw.function_timeout_s < 0:
        errors.append(f"--reward.function_timeout_s must be >= 0 (got {rw.function_timeout_s}); 0 sets no limit.")
    if rw.kind == "model" and (rw.concurrency != 1 or rw.samples_per_call):
        errors.append("--reward.concurrency and --reward.samples_per_call apply to reward functions and endpoints; "
                      "a reward model (--reward.kind model) scores in forward passes of --reward.micro_batch_size "
                      "sequences. Unset them, and use --reward.replicas to score on several actors at once.")
    if rw.kind != "function" and rw.function_timeout_s:
        errors.append(f"--reward.function_timeout_s applies to reward functions, not --reward.kind {rw.kind}"
                      + (": requests to the endpoint time out after --reward.http_timeout_s." if rw.kind == "http"
                         else ". Unset it."))
    if rw.kind == "model" and not rw.model_path:
        errors.append("--reward.kind model needs --reward.model_path <checkpoint dir>.")
    if rw.clip is not None and rw.clip <= 0:
        errors.append(f"--reward.clip must be > 0 (got {rw.clip}): scores are clipped to [-clip, clip]; "
                      "unset it to keep them unclipped.")
    return errors


def _eval_errors(cfg: Config) -> list[str]:
    ev, errors = cfg.eval, []
    if ev.every < 0:
        errors.append(f"--eval.every must be >= 0 (got {ev.every}); 0 never evaluates.")
    if ev.every <= 0:
        return errors  # the other eval settings are never used
    if ev.prompts is None and ev.holdout < 1:
        errors.append(f"--eval.holdout must be >= 1 (got {ev.holdout}) when --eval.prompts is unset.")
    if ev.max_prompts < 1 or ev.samples_per_prompt < 1 or ev.temperature < 0:
        errors.append("--eval.max_prompts and --eval.samples_per_prompt must be >= 1 and --eval.temperature >= 0.")
    if ev.temperature == 0 and ev.samples_per_prompt > 1:
        errors.append(f"--eval.samples_per_prompt {ev.samples_per_prompt} with greedy decoding "
                      "(--eval.temperature 0) repeats the same response; set it to 1 or raise the temperature.")
    tokens = ev.max_new_tokens if ev.max_new_tokens is not None else cfg.rollout.max_new_tokens
    prompt, room = cfg.data.max_prompt_tokens, cfg.rollout.max_model_len
    if tokens < 1:
        errors.append(f"--eval.max_new_tokens must be >= 1 (got {tokens}).")
    elif prompt + tokens > room:
        errors.append(f"--rollout.max_model_len {room} cannot hold --data.max_prompt_tokens {prompt} + "
                      f"--eval.max_new_tokens {tokens}; raise it to at least {prompt + tokens} or shorten the "
                      "evaluation responses.")
    return errors


def interface_errors(name: str | None, flag: str) -> list[str]:
    """A named network interface must exist on this machine (where the driver runs, a node of the cluster)."""
    import socket

    if not name:
        return []
    have = sorted(n for _, n in socket.if_nameindex())
    if name not in have:
        return [f"{flag} {name!r}: no such network interface on this machine (it has {', '.join(have)}); "
                "name the interface of the cluster network, or unset it."]
    return []


def _resource_errors(cfg: Config) -> list[str]:
    res, errors = cfg.resources, []
    errors += interface_errors(res.network_interface, "--resources.network_interface")
    if res.max_actor_restarts < 0 or res.max_learner_restarts < 0:
        errors.append("--resources.max_actor_restarts and --resources.max_learner_restarts must be >= 0.")
    if res.gpu_memory_gib is not None and not res.gpu_memory_gib > 0:
        errors.append(f"--resources.gpu_memory_gib must be > 0 (got {res.gpu_memory_gib}): it is one GPU's memory in "
                      "GiB for the memory plan; unset it (null) to use the GPUs the launcher sees.")
    if cfg.checkpoint.every < 0:
        errors.append("--checkpoint.every must be >= 0 (0 saves only at the end / on stop).")
    if cfg.model.critic_path and not cfg.model.separate_critic:
        errors.append("--model.critic_path is set but --model.separate_critic is false; set it true or drop the path.")
    for role in ("learner", "rollout", "reference", "reward"):
        errors += resource_errors(getattr(res, role), f"resources.{role}")
    return errors


# --------------------------------------------------------------------------- LoRA and the reference's source


def reference_from_learner(cfg: Config) -> bool:
    """Whether the learner ranks compute the reference logprobs (base model = adapters off) instead
    of a separate reference role: reference.from_learner, or when unset, on with LoRA unless a
    separate reference checkpoint (reference.path) was asked for."""
    wanted = cfg.reference.from_learner
    if wanted is not None:
        return wanted
    return cfg.model.lora.rank > 0 and not cfg.reference.path


def lora_errors(cfg: Config) -> list[str]:
    """model.lora and reference.from_learner."""
    lora, errors = cfg.model.lora, []
    if lora.rank < 0:
        errors.append(f"--model.lora.rank must be >= 0 (got {lora.rank}); 0 turns LoRA off.")
    if lora.rank > 0:
        if not lora.alpha > 0:
            errors.append(f"--model.lora.alpha must be > 0 (got {lora.alpha}); the update is scaled by alpha / rank.")
        if lora.dropout != 0:
            errors.append(f"--model.lora.dropout is {lora.dropout}: dropout makes the forward random, so PPO's "
                          "on-policy ratio would not be 1 and the reference would not be the base model; set it to 0.")
        if not lora.target_modules or any(not t for t in lora.target_modules):
            errors.append("--model.lora.target_modules is empty; name the linear layers to adapt, e.g. "
                          "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj].")
    if cfg.reference.from_learner and lora.rank == 0:
        errors.append("--reference.from_learner true needs LoRA: the base model is the policy with its adapters "
                      "off. Set --model.lora.rank > 0, or --reference.from_learner false.")
    if cfg.reference.replicas > 1 and reference_from_learner(cfg):
        why = "--reference.from_learner true" if cfg.reference.from_learner else \
            "LoRA (--model.lora.rank > 0 turns --reference.from_learner on unless --reference.path is set)"
        errors.append(f"--reference.replicas {cfg.reference.replicas} has no effect with reference.from_learner, "
                      f"here from {why}: the learner ranks compute the reference logprobs, each over its own slice "
                      "of the batch, and there is no reference actor to replicate. Drop --reference.replicas, or set "
                      "--reference.from_learner false for separate reference actors.")
    if cfg.reference.from_learner and cfg.reference.path:
        errors.append(f"--reference.from_learner true uses the policy's base model ({cfg.model.path}), but "
                      f"--reference.path is {cfg.reference.path}; drop one of them.")
    return errors
