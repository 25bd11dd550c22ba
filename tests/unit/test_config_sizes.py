"""Derived batch sizes: what resolve() returns, the exact divisions it asks for, and that those
are exactly the divisions the learner ranks perform (no more, no fewer)."""

import itertools

import pytest
import torch

from rlhf_ray.batch import ExperienceBatch
from rlhf_ray.config import Config, ConfigError, Sizes, config_from_dict, resolve, validate
from tests.unit.test_config import _load

# ---- derived sizes ---------------------------------------------------------------


def test_default_sizes():
    assert validate(Config()) == Sizes(grad_accum_steps=4, optimizer_steps_per_iteration=2)


def test_sizes_of_a_non_trivial_config():
    cfg = config_from_dict({
        "rollout": {"prompts_per_iteration": 6, "samples_per_prompt": 4, "num_engines": 3},
        "ppo": {"mini_batches": 3, "epochs": 2},
        "learner": {"num_ranks": 2, "micro_batch_size": 2},
    })
    # 24 samples; 12 per rank; 3 mini-batches of 4 per rank = 2 micro-batches of 2; 2 epochs x 3 steps.
    assert resolve(cfg) == Sizes(grad_accum_steps=2, optimizer_steps_per_iteration=6)


@pytest.mark.parametrize(
    "overrides, problem, flags",
    [
        (["--learner.num_ranks", "3"], "samples per iteration / learner ranks: 64 is not divisible by 3",
         "--rollout.prompts_per_iteration, --rollout.samples_per_prompt or --learner.num_ranks"),
        (["--ppo.mini_batches", "3"], "samples per learner rank / mini-batches: 32 is not divisible by 3",
         "--rollout.prompts_per_iteration, --rollout.samples_per_prompt, --learner.num_ranks or --ppo.mini_batches"),
        (["--ppo.mini_batches", "32", "--learner.micro_batch_size", "1", "--learner.num_ranks", "4",
          "--rollout.samples_per_prompt", "4"],
         "samples per learner rank / mini-batches: 8 is not divisible by 32",
         "--rollout.prompts_per_iteration, --rollout.samples_per_prompt, --learner.num_ranks or --ppo.mini_batches"),
        (["--learner.micro_batch_size", "5"], "per-rank mini-batch / micro-batch: 16 is not divisible by 5",
         "--learner.micro_batch_size or --ppo.mini_batches"),
    ],
)
def test_inexact_division_names_the_flags(overrides, problem, flags):
    with pytest.raises(ConfigError) as err:
        _load(overrides)
    assert f"{problem}; change {flags}." in str(err.value)


def test_only_the_first_broken_division_is_reported():
    # 64 samples over 3 ranks already fails; the mini-batch split of a rank's share is not reached.
    with pytest.raises(ConfigError) as err:
        _load(["--learner.num_ranks", "3", "--ppo.mini_batches", "3"])
    assert "learner ranks: 64 is not divisible by 3" in str(err.value)
    assert "mini-batches" not in str(err.value)


def test_prompts_need_not_divide_over_the_engines():
    # Rejected before ("prompts per iteration / engines: 8 is not divisible by 3"), although the
    # rollout group gives each engine ceil(8 / 3) = 3 prompts and the last one 2.
    cfg = _load(["--rollout.num_engines", "3"])
    assert (cfg.rollout.num_engines, cfg.rollout.prompts_per_iteration) == (3, 8)
    # 64 samples, 2 ranks of 32, 2 mini-batches of 16 per rank, micro-batches of 16.
    assert validate(cfg) == Sizes(grad_accum_steps=1, optimizer_steps_per_iteration=2)
    more_engines_than_prompts = config_from_dict({"rollout": {"prompts_per_iteration": 2, "num_engines": 3}})
    assert resolve(more_engines_than_prompts).optimizer_steps_per_iteration == 2


def test_token_budget_replaces_the_micro_batch_division():
    # 16 sequences per rank per step do not divide into micro-batches of 5, but with a token
    # budget micro-batches are sized at run time and DeepSpeed's accumulation count is nominal.
    cfg = _load(["--learner.micro_batch_size", "5", "--learner.micro_batch_tokens", "512"])
    assert resolve(cfg).grad_accum_steps == 1
    with pytest.raises(ConfigError, match="micro_batch_tokens and --learner.forward_max_tokens must be >= 0"):
        _load(["--learner.micro_batch_tokens", "-1"])


def test_token_budget_still_needs_the_rank_and_mini_batch_divisions():
    with pytest.raises(ConfigError, match="samples per learner rank / mini-batches: 32 is not divisible by 3"):
        _load(["--learner.micro_batch_tokens", "512", "--ppo.mini_batches", "3"])


def test_resolve_raises_config_error_which_is_a_value_error():
    cfg = config_from_dict({"learner": {"num_ranks": 3}})
    with pytest.raises(ValueError, match="batch sizes do not divide"):
        resolve(cfg)


# ---- the divisions are the learners' split, nothing more --------------------------------


def _batch(n: int) -> ExperienceBatch:
    rows = torch.arange(n).unsqueeze(1)
    ones = torch.ones(n, 1, dtype=torch.bool)
    return ExperienceBatch(input_ids=rows, attention_mask=ones, position_ids=rows * 0, response_mask=ones,
                           rollout_logprobs=torch.zeros(n, 1), truncated=~ones[:, 0], prompt_index=rows[:, 0])


def _learners_split(samples: int, ranks: int, mini_batches: int, micro: int) -> list[int]:
    """The micro-batch sizes the learner ranks would run: ``LearnerGroup`` slices the batch per
    rank, ``Learner.train`` splits each shard into mini-batches and ``Learner._step_plan`` cuts
    micro-batches of ``micro`` rows (a short one fails ``select``, as in the learner)."""
    sizes = []
    for shard in _batch(samples).split(ranks):
        for mini in shard.split(mini_batches):
            for i in range(0, len(mini), micro):
                sizes.append(len(mini.select(torch.arange(i, i + micro))))
    return sizes


def test_resolve_accepts_exactly_what_the_learners_can_split():
    for prompts, per_prompt, ranks, minis, micro in itertools.product(range(1, 7), (1, 2, 4), (1, 2, 3, 4),
                                                                       (1, 2, 3), (1, 2, 4)):
        cfg = config_from_dict({
            "rollout": {"prompts_per_iteration": prompts, "samples_per_prompt": per_prompt},
            "ppo": {"mini_batches": minis}, "learner": {"num_ranks": ranks, "micro_batch_size": micro}})
        try:
            split = _learners_split(prompts * per_prompt, ranks, minis, micro)
        except (ValueError, IndexError):
            split = None
        try:
            sizes = resolve(cfg)
        except ConfigError:
            sizes = None
        case = (prompts, per_prompt, ranks, minis, micro)
        assert (sizes is None) == (split is None), case
        if sizes is not None:
            assert split == [micro] * (ranks * minis * sizes.grad_accum_steps), case
