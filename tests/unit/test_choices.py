"""One home per choice: each name a user can pick is declared once, and these tests fail when a
choice is added in one place only.

- ``ppo.estimator``: ``rlhf_ray.algorithms.ESTIMATORS`` (name -> function, uses_critic,
  uses_groups) is the home. The config's ``Literal`` and its critic/group tuples mirror it (the
  config imports no torch), the coordinator dispatches through it without naming an estimator,
  the field's ``--help`` text names each one, and each has a hand-computed case here.
- The algorithm's other choices (KL estimator, loss aggregation, ratio level, rollout correction)
  mirror the tuples of ``rlhf_ray.algorithms``; ``model.build_tiny`` the architectures
  ``rlhf_ray.tiny_models`` builds.
- Every ``Literal`` field of every config tree is refused outside its options by that tree's
  validation (one message style) and lists its options in ``--help``; the SFT/RM trees use the
  PPO tree's choices where they share one.
"""

from __future__ import annotations

import inspect
import math
import re
import typing

import pytest
import torch

from rlhf_ray import launch
from rlhf_ray.algorithms import AGGREGATION_MODES, CORRECTION_MODES, ESTIMATORS, KL_ESTIMATORS, RATIO_LEVELS
from rlhf_ray.config import (Config, DataConfig, ModelConfig, PPOConfig, choices_of, config_from_dict, fields_help,
                             iter_fields, validate)
from rlhf_ray.config.ppo_section import CRITIC_ESTIMATORS, GROUP_ESTIMATORS
from rlhf_ray.coordinator import advantages
from rlhf_ray.coordinator.advantages import estimate_advantages
from rlhf_ray.supervised.config import (PreferenceDataConfig, RMRunConfig, SFTDataConfig, SFTRunConfig,
                                        TrainModelConfig, validate_rm, validate_sft)

ROOTS = [(Config, validate), (SFTRunConfig, validate_sft), (RMRunConfig, validate_rm)]


def _choices(cls: type, name: str) -> tuple:
    return choices_of(typing.get_type_hints(cls)[name])


# ---- ppo.estimator: the table and what reads it ---------------------------------------------------


def test_config_estimator_names_are_the_tables():
    assert _choices(PPOConfig, "estimator") == tuple(ESTIMATORS)


def test_config_critic_and_group_estimators_mirror_the_table():
    assert CRITIC_ESTIMATORS == tuple(name for name, e in ESTIMATORS.items() if e.uses_critic)
    assert GROUP_ESTIMATORS == tuple(name for name, e in ESTIMATORS.items() if e.uses_groups)
    for name, entry in ESTIMATORS.items():
        p = PPOConfig(estimator=name)
        assert (p.uses_critic, p.uses_groups) == (entry.uses_critic, entry.uses_groups), name


def test_estimator_help_names_every_estimator_and_every_function_has_a_doc():
    doc = {name: d for name, _, _, d in iter_fields(PPOConfig)}["estimator"]
    for name, entry in ESTIMATORS.items():
        assert re.search(rf"\b{name}\b", doc), f"--ppo.estimator's doc does not describe {name}"
        assert inspect.getdoc(entry.compute), f"ESTIMATORS[{name!r}].compute has no docstring"


def test_the_coordinator_dispatches_through_the_table_only():
    source = inspect.getsource(advantages)
    named = [name for name in ESTIMATORS if f'"{name}"' in source or f"'{name}'" in source]
    assert named == [], f"coordinator/advantages.py names estimators {named}: read ESTIMATORS instead"


# Scores [1, 3, 2, 6] in groups [0, 0, 1, 1], R = 2 tokens each (all valid), no KL, values 0,
# gamma 1, lam 0.5, no whitening for gae. Per-token rewards are [0, s] (the score at the last token).
SCORES, GROUPS = [1.0, 3.0, 2.0, 6.0], [0, 0, 1, 1]
C_PP = [-2.0, 0.0, -1.0, 3.0]  # scores minus the batch mean 3; over 8 tokens the unbiased var is 28 / 7 = 4
C_BASE = [-1.0, 1.0, -2.0, 2.0]  # scores minus their group's mean; var 20 / 7 over 8 tokens (mean 0)
EXPECTED = {  # (B, R) advantages, by hand
    # GAE: A_1 = delta_1 = s, A_0 = delta_0 + gamma * lam * A_1 = 0 + 0.5 s; returns = A (values 0).
    "gae": [[0.5 * s, s] for s in SCORES],
    # GRPO: group 0 mean 2, std sqrt(2); group 1 mean 4, std sqrt(8): +-1/sqrt(2) each.
    "grpo": [[v / math.sqrt(2)] * 2 for v in (-1.0, 1.0, -1.0, 1.0)],
    # RLOO: s_i minus the other sample of its group.
    "rloo": [[v] * 2 for v in (-2.0, 2.0, -4.0, 4.0)],
    # REINFORCE++: both tokens' return is s, whitened over the 8 tokens: (s - 3) / 2.
    "reinforce_pp": [[c / 2.0] * 2 for c in C_PP],
    # REINFORCE++-baseline: the same on the group-centred scores.
    "reinforce_pp_baseline": [[c / math.sqrt(20 / 7)] * 2 for c in C_BASE],
}


def test_every_estimator_has_a_hand_computed_case():
    assert set(EXPECTED) == set(ESTIMATORS)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_runs_through_the_dispatch_with_its_hand_values(name):
    p = PPOConfig(estimator=name, gamma=1.0, lam=0.5, whiten_advantages=False)
    mask = torch.ones(4, 2, dtype=torch.bool)
    out = estimate_advantages(p, torch.tensor(SCORES), torch.zeros(4, 2), 0.1, torch.zeros(4, 2),
                              torch.tensor(GROUPS), mask, torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(out.advantages, torch.tensor(EXPECTED[name]), rtol=1e-5, atol=1e-5)
    if ESTIMATORS[name].uses_critic:
        torch.testing.assert_close(out.returns, torch.tensor(EXPECTED[name]))
    else:
        assert torch.equal(out.returns, torch.zeros(4, 2))
    assert all(math.isfinite(v) for v in out.metrics.values())


# ---- the algorithm's other choices ----------------------------------------------------------------


@pytest.mark.parametrize("field, table", [
    ("kl_estimator", ("auto", *KL_ESTIMATORS)),
    ("loss_agg", ("auto", *AGGREGATION_MODES)),
    ("ratio", RATIO_LEVELS),
    ("rollout_correction", ("auto", *CORRECTION_MODES)),
])
def test_ppo_choices_mirror_the_algorithms_tables(field, table):
    assert _choices(PPOConfig, field) == table


def test_tiny_model_choices_are_the_architectures_the_builder_knows():
    from rlhf_ray import tiny_models  # imports transformers

    assert _choices(ModelConfig, "build_tiny") == (None, *tiny_models._ARCHS)


# ---- every choice field: validation, --help, shared choices ---------------------------------------


def _choice_fields(cls: type) -> list[tuple[str, tuple]]:
    return [(name, choices_of(tp)) for name, tp, _, _ in iter_fields(cls) if choices_of(tp) is not None]


def test_the_trees_have_choice_fields():
    names = {cls: [name for name, _ in _choice_fields(cls)] for cls, _ in ROOTS}
    assert "ppo.estimator" in names[Config] and "learner.zero_stage" in names[Config]
    assert "data.format" in names[SFTRunConfig] and "data.format" in names[RMRunConfig]


@pytest.mark.parametrize("cls, check", ROOTS, ids=lambda x: getattr(x, "__name__", ""))
def test_validation_refuses_every_choice_field_outside_its_options(cls, check):
    for name, allowed in _choice_fields(cls):
        bad = 99 if isinstance(allowed[-1], int) else "not-an-option"
        tree: dict = {}
        *sections, leaf = name.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = bad
        with pytest.raises(ValueError) as err:
            check(config_from_dict(tree, cls))
        assert f"--{name} is {bad!r}; choose one of {list(allowed)}." in str(err.value), name


@pytest.mark.parametrize("cls", [cls for cls, _ in ROOTS], ids=lambda c: c.__name__)
def test_help_lists_the_options_of_every_choice_field(cls):
    lines = fields_help(cls).split("\n  --")
    for name, allowed in _choice_fields(cls):
        (line,) = [x for x in lines if x.lstrip("- ").startswith(name + " ")]
        assert line.rstrip().endswith(f"(one of {list(allowed)})"), name


def test_the_launcher_help_is_the_config_help():
    assert launch.build_parser().epilog.endswith(fields_help(Config))


@pytest.mark.parametrize("section, ppo_section, fields", [
    (TrainModelConfig, ModelConfig, ("build_tiny", "dtype")),
    (SFTDataConfig, DataConfig, ("template", "too_long")),
    (PreferenceDataConfig, DataConfig, ("template", "too_long")),
])
def test_supervised_trees_reuse_the_ppo_trees_choices(section, ppo_section, fields):
    for name in fields:
        assert typing.get_type_hints(section)[name] == typing.get_type_hints(ppo_section)[name], name
    assert _choices(SFTDataConfig, "format") == _choices(PreferenceDataConfig, "format")
