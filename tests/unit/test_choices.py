"""One home per choice: each name a user can pick is declared once, and these tests fail when a
choice is added in one place only.

- ``ppo.estimator``: ``rlhf_ray.algorithms.ESTIMATORS`` (name -> function, uses_critic,
  uses_groups) is the home. The config's ``Literal`` and its critic/group tuples mirror it (the
  config imports no torch), the coordinator dispatches through it without naming an estimator,
  the field's ``--help`` text names each one, and each has a hand-computed case in
  ``tests/unit/test_estimators.py``.
- The algorithm's other choices (KL estimator, loss aggregation, ratio level, rollout correction)
  mirror the tuples of ``rlhf_ray.algorithms``; ``model.build_tiny`` the architectures
  ``rlhf_ray.tiny_models`` builds; the pipeline's ``demo_task`` the demo data sets.
- Every ``Literal`` field of every config tree is refused outside its options by that tree's
  validation (one message style) and lists its options in ``--help``; the SFT/RM trees use the
  PPO tree's choices where they share one.
"""

from __future__ import annotations

import inspect
import re
import typing

import pytest
import torch

from rlhf_ray import launch
from rlhf_ray.algorithms import (AGGREGATION_MODES, CORRECTION_MODES, ESTIMATORS, KL_ESTIMATORS, RATIO_LEVELS,
                                 AdvantageInputs)
from rlhf_ray.config import (Config, DataConfig, ModelConfig, PPOConfig, choices_of, config_from_dict, fields_help,
                             iter_fields, validate)
from rlhf_ray.config.ppo_section import CRITIC_ESTIMATORS, GROUP_ESTIMATORS
from rlhf_ray.coordinator import advantages
from rlhf_ray.coordinator.advantages import estimate_advantages
from rlhf_ray.data.demo_data import TASK_FILES
from rlhf_ray.supervised.config import (PipelineConfig, PreferenceDataConfig, RMRunConfig, SFTDataConfig, SFTRunConfig,
                                        TrainModelConfig, validate_pipeline, validate_rm, validate_sft)

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


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_runs_through_the_dispatch_with_the_configs_settings(name):
    # The coordinator hands the table entry the section's settings, the KL coefficient only with the
    # KL in the reward, the old values only to a critic (hand cases per estimator: test_estimators.py).
    g = torch.Generator().manual_seed(0)
    scores, kl, values = torch.randn(4, generator=g), torch.rand(4, 3, generator=g), torch.randn(4, 3, generator=g)
    groups, valid = torch.tensor([0, 0, 1, 1]), torch.ones(4, dtype=torch.bool)
    mask = torch.ones(4, 3, dtype=torch.bool)
    entry = ESTIMATORS[name]
    for kl_in, reward_kl in (("reward", 0.1), ("loss", 0.0)):
        p = PPOConfig(estimator=name, kl_in=kl_in, gamma=0.9, lam=0.5, whiten_advantages=False, group_std_norm=False)
        out = estimate_advantages(p, scores, kl, 0.1, values, groups, mask, valid)
        want = entry.compute(AdvantageInputs(scores, kl, reward_kl, values if entry.uses_critic else None, groups,
                                             mask, valid, gamma=0.9, lam=0.5, whiten=False, group_std_norm=False))
        assert torch.equal(out.advantages, want.advantages) and torch.equal(out.returns, want.returns), kl_in
        assert out.metrics == {k: float(v) for k, v in want.metrics.items()}
        if not entry.uses_critic:
            assert torch.equal(out.returns, torch.zeros(4, 3))


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


@pytest.mark.parametrize("cls", [cls for cls, _ in ROOTS] + [PipelineConfig], ids=lambda c: c.__name__)
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


def test_pipeline_demo_tasks_are_the_demo_data_sets_and_are_checked():
    assert set(_choices(PipelineConfig, "demo_task")) == set(TASK_FILES)
    with pytest.raises(ValueError) as err:
        validate_pipeline(PipelineConfig(demo_task="sums"))
    assert "--demo_task is 'sums'; choose one of ['compare', 'digits', 'tools']." in str(err.value)
