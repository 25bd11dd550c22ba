"""Validation of a whole PPO config before Ray starts: every problem in one ConfigError, each
naming the flag and how to fix it; and the PPO settings the math would reject mid-run are
rejected here first."""

import pytest
import torch

from rlhf_ray.algorithms import AdaptiveKLController, FixedKLController, clip_scores, clipped_surrogate, value_loss
from rlhf_ray.config import (Config, ConfigError, config_from_dict, config_to_dict, load_config, parse_overrides,
                             validate)
from tests.unit.test_config import DEMO, PINNED, _load

# ---- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, choices",
    [
        ("model.dtype", "float16", "['float32', 'bfloat16']"),
        ("model.build_tiny", "gpt2", "[None, 'llama', 'qwen2']"),
        ("data.too_long", "keep", "['drop', 'truncate', 'error']"),
        ("ppo.kl_estimator", "k4", "['auto', 'k1', 'k2', 'k3']"),
        ("learner.zero_stage", "4", "[0, 1, 2, 3]"),
        ("sync.transport", "nccl", "['collective', 'object_store']"),
        ("resources.strategy", "pack", "['PACK', 'SPREAD', 'STRICT_PACK', 'STRICT_SPREAD']"),
    ],
)
def test_invalid_choices_name_the_flag_and_the_choices(key, value, choices):
    with pytest.raises(ConfigError) as err:
        _load([f"--{key}", value])
    shown = repr(int(value)) if value.isdigit() else repr(value)
    assert f"--{key} is {shown}; choose one of {choices}." in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--ppo.epochs", "0"], "--ppo.epochs must be > 0 (got 0)."),
        (["--learner.lr", "-1.0e-5"], "--learner.lr must be > 0 (got -1e-05)."),
        (["--rollout.top_p", "0"], "--rollout.top_p must be in (0, 1] (got 0.0)."),
        (["--ppo.lam", "1.5"], "--ppo.gamma and --ppo.lam must be in [0, 1]."),
        (["--ppo.dual_clip", "1.0"], "--ppo.dual_clip must be > 1 (got 1.0); unset it to disable."),
        (["--ppo.kl_target", "0"], "--ppo.kl_target must be > 0, or unset for a fixed coefficient."),
        (["--reward.kind", "model"], "--reward.kind model needs --reward.model_path <checkpoint dir>."),
        (["--model.critic_path", "x"], "--model.critic_path is set but --model.separate_critic is false"),
        (["--resources.learner.threads", "0"], "--resources.learner: num_cpus/num_gpus must be >= 0 and threads >= 1."),
        (["--ppo.lam_critic", "1.2"], "--ppo.lam_critic must be in [0, 1] (got 1.2)"),
        (["--ppo.lam_adaptive_alpha", "0"], "--ppo.lam_adaptive_alpha must be > 0 (got 0.0); VAPO uses 0.05."),
        (["--ppo.estimator", "grpo", "--ppo.lam_critic", "1.0"],
         "--ppo.lam_critic shapes GAE's lambdas, but --ppo.estimator is 'grpo'"),
    ],
)
def test_out_of_range_values_name_the_flag(overrides, message):
    with pytest.raises(ConfigError) as err:
        _load(overrides)
    assert message in str(err.value)


def test_max_model_len_too_small_says_how_much_is_needed():
    with pytest.raises(ConfigError) as err:
        _load(["--rollout.max_model_len", "63"])  # 48 prompt + 16 new tokens
    assert (
        "--rollout.max_model_len 63 cannot hold --data.max_prompt_tokens 48 + --rollout.max_new_tokens 16; "
        "raise it to at least 64" in str(err.value)
    )
    assert _load(["--rollout.max_model_len", "64"]).rollout.max_model_len == 64  # exactly enough


def test_every_problem_is_listed_in_one_error():
    with pytest.raises(ConfigError) as err:
        _load(["--model.dtype", "float16", "--ppo.epochs", "0", "--rollout.max_model_len", "10"])
    msg = str(err.value)
    assert msg.startswith("invalid config:")
    assert "--model.dtype" in msg and "--ppo.epochs must be > 0" in msg and "--rollout.max_model_len 10" in msg


def test_log_every_zero_is_rejected_before_the_run():
    with pytest.raises(ConfigError, match="--logging.log_every"):
        _load(["--logging.log_every", "0"])


# ---- evaluation section ------------------------------------------------------------------


def test_eval_is_off_by_default_and_greedy_when_on():
    cfg = _load(["--eval.every", "5"])
    assert Config().eval.every == 0
    assert (cfg.eval.every, cfg.eval.temperature, cfg.eval.samples_per_prompt, cfg.eval.prompts) == (5, 0.0, 1, None)


@pytest.mark.parametrize("args, message", [
    (["--eval.every", "-1"], r"--eval.every must be >= 0"),
    (["--eval.every", "2", "--eval.samples_per_prompt", "4"], r"samples_per_prompt 4 with greedy decoding"),
    (["--eval.every", "2", "--eval.holdout", "0"], r"--eval.holdout must be >= 1"),
    (["--eval.every", "2", "--eval.temperature", "-0.5"], r"--eval.temperature >= 0"),
    (["--eval.every", "2", "--eval.max_new_tokens", "1000"], r"cannot hold --data.max_prompt_tokens 48 \+ "
                                                              r"--eval.max_new_tokens 1000; raise it to at least 1048"),
])
def test_eval_errors_name_the_flag_and_the_fix(args, message):
    with pytest.raises(ConfigError, match=message):
        _load(args)


def test_eval_settings_are_not_checked_while_eval_is_off():
    assert _load(["--eval.every", "0", "--eval.samples_per_prompt", "4"]).eval.samples_per_prompt == 4  # never used
    assert _load(["--eval.every", "2", "--eval.samples_per_prompt", "4", "--eval.temperature", "1"]).eval.every == 2


# ---- PPO settings the math cannot run -------------------------------------------------------
# Each of these configs loaded before these rules existed; the run then failed (or silently did
# something else) inside a learner or the coordinator, after Ray and every model had started.


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--ppo.clip_ratio", "1.5"], "--ppo.clip_ratio must be in (0, 1] (got 1.5): the ratio is clipped to "
                                      "[1 - clip_ratio, 1 + clip_ratio], and 0.1 to 0.3 is usual."),
        (["--ppo.clip_ratio", "0"], "--ppo.clip_ratio must be in (0, 1] (got 0.0)"),
        (["--ppo.clip_ratio_high", "0"], "--ppo.clip_ratio_high must be > 0 (got 0.0); unset it to clip the "
                                         "upper side with --ppo.clip_ratio too."),
        (["--ppo.value_clip", "0"], "--ppo.value_clip must be > 0 (got 0.0); unset it (null) to disable value "
                                    "clipping."),
        (["--ppo.value_clip", "-0.2"], "--ppo.value_clip must be > 0 (got -0.2)"),
        (["--ppo.vf_coef", "-0.1"], "--ppo.vf_coef must be >= 0 (got -0.1); a negative weight trains the critic "
                                    "away from the returns."),
        (["--ppo.entropy_coef", "-0.01"], "--ppo.entropy_coef must be >= 0 (got -0.01); 0 disables the entropy "
                                          "bonus"),
        (["--ppo.kl_coef", "-0.02"], "--ppo.kl_coef must be >= 0 (got -0.02); 0 disables the KL penalty"),
        (["--ppo.kl_coef", "0", "--ppo.kl_target", "0.01"],
         "--ppo.kl_coef 0 with --ppo.kl_target 0.01: the adaptive controller multiplies the coefficient, so it can "
         "never leave 0; start --ppo.kl_coef above 0 (e.g. 0.02) or unset --ppo.kl_target for no KL penalty."),
        (["--learner.max_grad_norm", "-1"], "--learner.max_grad_norm must be >= 0 (got -1.0); 0 disables gradient "
                                            "clipping."),
        (["--learner.weight_decay", "-0.1"], "--learner.weight_decay must be >= 0 (got -0.1); 0 disables weight "
                                             "decay."),
        (["--learner.adam_betas", "[0.9, 1.0]"], "--learner.adam_betas must both be in [0, 1) (got [0.9, 1.0]); "
                                                 "e.g. [0.9, 0.95]."),
        (["--learner.adam_betas", "[-0.1, 0.95]"], "--learner.adam_betas must both be in [0, 1) (got [-0.1, 0.95])"),
        (["--learner.value_head_lr", "0"], "--learner.value_head_lr must be > 0 (got 0.0); unset it to use "
                                           "--learner.lr."),
        (["--model.value_head_init_std", "-0.1"], "--model.value_head_init_std must be >= 0 (got -0.1); 0 gives a "
                                                  "zero-initialised value head."),
        (["--rollout.top_k", "0"], "--rollout.top_k must be -1 (top-k off) or >= 1 (got 0)."),
        (["--rollout.top_k", "-2"], "--rollout.top_k must be -1 (top-k off) or >= 1 (got -2)."),
        (["--rollout.vllm.gpu_memory_utilization", "1.5"], "--rollout.vllm.gpu_memory_utilization must be in (0, 1] (got 1.5)"),
        (["--rollout.tensor_parallel_size", "0"], "--rollout.tensor_parallel_size must be > 0 (got 0)."),
        (["--reward.clip", "0"], "--reward.clip must be > 0 (got 0.0): scores are clipped to [-clip, clip]; unset "
                                 "it to keep them unclipped."),
        (["--reward.clip", "-1"], "--reward.clip must be > 0 (got -1.0)"),
        (["--sync.max_logprob_mismatch", "-0.1"], "--sync.max_logprob_mismatch must be >= 0 (got -0.1)"),
    ],
)
def test_impossible_settings_name_the_flag_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        _load(overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["--ppo.clip_ratio", "1"],  # lower bound 0: still a valid clip
        ["--ppo.clip_ratio_high", "0.28"],  # DAPO's clip-higher
        ["--ppo.value_clip", "null"],
        ["--ppo.vf_coef", "0", "--ppo.entropy_coef", "0", "--ppo.kl_coef", "0", "--ppo.kl_target", "null"],
        ["--ppo.kl_coef", "0.01", "--ppo.kl_target", "0.05"],
        ["--ppo.kl_estimator", "k3", "--ppo.kl_in", "loss"],  # k2/k3 as a loss term
        ["--learner.max_grad_norm", "0", "--learner.weight_decay", "0", "--learner.adam_betas", "[0, 0.999]"],
        ["--rollout.top_k", "-1"],
        ["--reward.clip", "5"],
        ["--sync.max_logprob_mismatch", "0"],
    ],
)
def test_boundary_settings_still_load(overrides):
    _load(overrides)


def test_all_new_problems_are_listed_together():
    with pytest.raises(ConfigError) as err:
        _load(["--ppo.clip_ratio", "2", "--ppo.vf_coef", "-1", "--rollout.top_k", "0", "--reward.clip", "0"])
    msg = str(err.value)
    for flag in ("--ppo.clip_ratio", "--ppo.vf_coef", "--rollout.top_k", "--reward.clip"):
        assert flag in msg


def _math_rejects(p, reward_clip) -> bool:
    """Whether the run-time math refuses these settings, called as the learner and coordinator call it."""
    x, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    try:
        clipped_surrogate(x, x, x, mask, p.clip_ratio, clip_ratio_high=p.clip_ratio_high, dual_clip=p.dual_clip)
        value_loss(x, x, x, mask, clip_range=p.value_clip)
        AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target else FixedKLController(p.kl_coef)
        clip_scores(torch.zeros(2), reward_clip)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize(
    "overrides",
    [
        [], ["--ppo.clip_ratio", "1"], ["--ppo.clip_ratio", "1.01"], ["--ppo.clip_ratio", "0"],
        ["--ppo.clip_ratio", "-0.2"], ["--ppo.clip_ratio_high", "0"], ["--ppo.clip_ratio_high", "-1"],
        ["--ppo.clip_ratio_high", "5"], ["--ppo.dual_clip", "1"], ["--ppo.dual_clip", "3"],
        ["--ppo.value_clip", "0"], ["--ppo.value_clip", "none"], ["--ppo.value_clip", "10"],
        ["--ppo.kl_coef", "-1e-3", "--ppo.kl_target", "null"], ["--ppo.kl_coef", "0", "--ppo.kl_target", "null"],
        ["--ppo.kl_coef", "-1e-3"], ["--ppo.kl_coef", "0", "--ppo.kl_target", "0.1"],
        ["--ppo.kl_coef", "1e-3", "--ppo.kl_target", "0.1"], ["--ppo.kl_target", "-0.1"],
        ["--reward.clip", "0"], ["--reward.clip", "1e-3"],
    ],
)
def test_validate_rejects_exactly_what_the_ppo_math_rejects(overrides):
    unchecked = load_config(DEMO, {**PINNED, **parse_overrides(overrides)}, validator=lambda cfg: None)
    try:
        validate(unchecked)
        rejected = False
    except ConfigError:
        rejected = True
    assert rejected == _math_rejects(unchecked.ppo, unchecked.reward.clip), overrides


# ---- the PPO family -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--ppo.kl_estimator", "k2"], "--ppo.kl_estimator k2 with --ppo.kl_in reward: only k1 is an unbiased"),
        (["--ppo.estimator", "grpo", "--rollout.samples_per_prompt", "1", "--rollout.prompts_per_iteration", "64"],
         "--ppo.estimator grpo compares the samples of one prompt: --rollout.samples_per_prompt must be >= 2"),
        (["--ppo.estimator", "rloo", "--rollout.samples_per_prompt", "1", "--rollout.prompts_per_iteration", "64"],
         "--ppo.estimator rloo compares"),
        (["--ppo.dynamic_sampling", "true", "--rollout.samples_per_prompt", "1",
          "--rollout.prompts_per_iteration", "64"], "--ppo.dynamic_sampling compares"),
        (["--ppo.estimator", "grpo", "--model.separate_critic", "true"], "a critic-free estimator trains no value"),
        (["--ppo.overlong_buffer", "99"], "--ppo.overlong_buffer must be in [0, --rollout.max_new_tokens"),
        (["--ppo.correction_low", "1.5"], "--ppo.correction_low < 1 < --ppo.correction_high"),
        (["--rollout.top_p", "0.9"], "the learner and the reference score the full softmax"),
        (["--rollout.top_k", "50"], "the learner and the reference score the full softmax"),
        (["--ppo.estimator", "ppo"], "--ppo.estimator is 'ppo'; choose one of"),
    ],
)
def test_family_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        _load(overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_every_estimator_loads_with_groups(estimator):
    cfg = _load(["--ppo.estimator", estimator, "--ppo.kl_in", "loss", "--ppo.kl_estimator", "k3",
                 "--ppo.loss_agg", "seq_mean_token_mean", "--ppo.ratio", "sequence",
                 "--ppo.rollout_correction", "tis", "--ppo.overlong_buffer", "4"])
    assert cfg.ppo.estimator == estimator


# ---- choices whose default depends on another setting ---------------------------------------------


@pytest.mark.parametrize(
    "overrides, field, expected",
    [
        ([], "kl_estimator", "k1"),  # a per-token reward: only k1 is unbiased
        (["--ppo.kl_in", "loss"], "kl_estimator", "k3"),  # a loss term: k1's expected gradient is 0
        (["--ppo.kl_in", "loss", "--ppo.kl_estimator", "auto"], "kl_estimator", "k3"),
        ([], "loss_agg", "token_mean"),
        (["--ppo.ratio", "sequence"], "loss_agg", "seq_mean_token_mean"),  # GSPO
        ([], "rollout_correction", "none"),
        (["--rollout.async_generation", "true"], "rollout_correction", "tis"),  # one step off-policy
        (["--rollout.max_staleness", "3"], "rollout_correction", "tis"),  # the pipeline, 3 versions behind at most
        (["--rollout.max_staleness", "0"], "rollout_correction", "none"),
    ],
)
def test_unset_choices_follow_the_settings_they_depend_on(overrides, field, expected):
    assert getattr(_load(overrides).ppo, field) == expected


@pytest.mark.parametrize(
    "overrides, field, expected",
    [
        (["--ppo.kl_in", "loss", "--ppo.kl_estimator", "k2"], "kl_estimator", "k2"),
        (["--ppo.ratio", "sequence", "--ppo.loss_agg", "seq_mean_token_mean"], "loss_agg", "seq_mean_token_mean"),
        (["--rollout.async_generation", "true", "--ppo.rollout_correction", "none"], "rollout_correction", "none"),
        (["--rollout.async_generation", "true", "--ppo.rollout_correction", "icepop"], "rollout_correction", "icepop"),
        (["--ppo.rollout_correction", "tis"], "rollout_correction", "tis"),
    ],
)
def test_explicit_choices_are_kept(overrides, field, expected):
    assert getattr(_load(overrides).ppo, field) == expected


def test_resolved_config_round_trips_through_its_dict():
    cfg = _load(["--ppo.kl_in", "loss", "--ppo.ratio", "sequence", "--rollout.async_generation", "true"])
    assert (cfg.ppo.kl_estimator, cfg.ppo.loss_agg, cfg.ppo.rollout_correction) == ("k3", "seq_mean_token_mean", "tis")
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--ppo.kl_in", "loss", "--ppo.kl_estimator", "k1"],
         "--ppo.kl_estimator k1 with --ppo.kl_in loss: as a loss term k1's gradient is grad log pi, whose "
         "expectation over the policy's own samples is zero"),
        (["--ppo.ratio", "sequence", "--ppo.loss_agg", "token_mean"],
         "--ppo.ratio sequence with --ppo.loss_agg token_mean: GSPO averages one clipped term per sequence, while "
         "token_mean weights each sequence by its length. Use --ppo.loss_agg seq_mean_token_mean"),
        (["--ppo.ratio", "sequence", "--ppo.loss_agg", "seq_mean_token_sum_norm"],
         "--ppo.ratio sequence with --ppo.loss_agg seq_mean_token_sum_norm"),
        (["--rollout.tensor_parallel_size", "2"],
         "--rollout.tensor_parallel_size 2 with --sync.transport collective: every tensor-parallel worker of an "
         "engine would join the broadcast group with the engine's one rank"),
    ],
)
def test_settings_that_silently_do_less_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        _load(overrides)
    assert message in str(err.value)


def test_tensor_parallel_engines_load_with_the_object_store_transport():
    cfg = _load(["--rollout.tensor_parallel_size", "2", "--sync.transport", "object_store"])
    assert cfg.rollout.tensor_parallel_size == 2
