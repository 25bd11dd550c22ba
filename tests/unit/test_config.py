"""The config tree: YAML + dotted overrides, types, immutability, the dict round trip.

Validation is in test_config_validate.py, derived sizes in test_config_sizes.py, the field docs
and the launcher in test_config_cli.py; they share the helpers defined here (``DEMO``,
``PINNED``, ``_load``, ``_write_yaml``).

Everything here runs before Ray would start, so none of it may import or start Ray; the
launch tests run ``python -m rlhf_ray.launch`` in a subprocess to check exactly that.
"""

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import (
    Config,
    ConfigError,
    RoleResources,
    config_from_dict,
    config_to_dict,
    get_path,
    load_config,
    parse_overrides,
    validate,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = str(REPO_ROOT / "configs" / "demo_cpu.yaml")


# The sizes the expected messages below are computed from, pinned so that edits to the
# demo config do not change them: 8 prompts x 8 samples = 64 samples, 2 ranks, 2 mini-batches.
PINNED = {
    "data.max_prompt_tokens": "48", "rollout.max_new_tokens": "16", "rollout.max_model_len": "128",
    "rollout.prompts_per_iteration": "8", "rollout.samples_per_prompt": "8", "rollout.num_engines": "1",
    "ppo.mini_batches": "2", "ppo.epochs": "1", "learner.num_ranks": "2", "learner.micro_batch_size": "16",
    "resources.rollout.num_cpus": "0.5",
}


def _load(overrides: list[str], path: str | None = None) -> Config:
    """The demo YAML with the pinned sizes and ``overrides``; or only ``overrides`` on ``path``."""
    if path is None:
        return load_config(DEMO, {**PINNED, **parse_overrides(overrides)})
    return load_config(path, parse_overrides(overrides))


def _write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# ---- parse_overrides ----------------------------------------------------------


def test_parse_overrides_both_forms_and_dashes():
    args = ["--ppo.clip_ratio", "0.3", "--ppo.epochs=2", "--learner.zero-stage", "1", "--name=a=b"]
    assert parse_overrides(args) == {
        "ppo.clip_ratio": "0.3",
        "ppo.epochs": "2",
        "learner.zero_stage": "1",  # dashes in the key become underscores
        "name": "a=b",  # only the first '=' separates key and value
    }


def test_parse_overrides_keeps_values_that_look_like_flags_or_negatives():
    assert parse_overrides(["--rollout.top_k", "-1", "--data.prompts", "--x"]) == {
        "rollout.top_k": "-1",
        "data.prompts": "--x",
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["ppo.clip_ratio", "0.3"], "unexpected argument 'ppo.clip_ratio'"),
        (["--", "1"], "unexpected argument '--'"),
        (["--ppo.epochs=2", "--ppo.clip_ratio"], "--ppo.clip_ratio needs a value"),
    ],
)
def test_parse_overrides_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(args)


# ---- loading: YAML + overrides --------------------------------------------------


def test_yaml_values_and_defaults_elsewhere(tmp_path):
    path = _write_yaml(
        tmp_path,
        """
        name: demo
        model: {path: artifacts/tiny, build_tiny: llama}
        data: {max_prompt_tokens: 48}
        learner: {micro_batch_size: 16, lr: 0.0005}
        resources:
          learner: {num_cpus: 0.5, threads: 1}
        """,
    )
    cfg = load_config(path)
    assert cfg.name == "demo"
    assert cfg.model.build_tiny == "llama"
    assert cfg.data.max_prompt_tokens == 48
    assert cfg.learner.micro_batch_size == 16
    assert cfg.learner.lr == 0.0005
    assert cfg.resources.learner == RoleResources(num_cpus=0.5, num_gpus=0.0, threads=1, custom={})
    # Not in the file: the dataclass defaults.
    assert cfg.model.dtype == "float32"
    assert cfg.ppo.clip_ratio == 0.2
    assert cfg.resources.reward == RoleResources()
    assert cfg.resources.strategy == "PACK"


def test_demo_config_is_valid():
    cfg = load_config(DEMO)
    assert cfg.name == "demo_cpu"
    validate(cfg)


def test_no_file_gives_the_default_config():
    assert load_config() == Config()
    assert load_config(None, {}) == Config()


def test_overrides_win_over_yaml_and_keep_sibling_keys(tmp_path):
    path = _write_yaml(
        tmp_path,
        """
        ppo:
          clip_ratio: 0.1
          epochs: 3
        resources:
          learner: {num_cpus: 2, threads: 4}
        """,
    )
    cfg = _load(["--ppo.clip_ratio", "0.3", "--resources.learner.num_cpus=0.5"], path)
    assert cfg.ppo.clip_ratio == 0.3
    assert cfg.ppo.epochs == 3  # same section, not overridden
    assert cfg.resources.learner.num_cpus == 0.5
    assert cfg.resources.learner.threads == 4  # same nested section, not overridden
    assert isinstance(cfg.resources.learner.num_cpus, float)


def test_equals_and_space_forms_give_the_same_config():
    assert _load(["--ppo.clip_ratio", "0.3"]) == _load(["--ppo.clip_ratio=0.3"])
    assert _load(["--ppo.clip_ratio", "0.3"]).ppo.clip_ratio == 0.3


def test_custom_resources_dict_override():
    cfg = _load(["--resources.rollout.custom", "{node_a: 1}"])
    assert cfg.resources.rollout.custom == {"node_a": 1.0}
    assert isinstance(cfg.resources.rollout.custom["node_a"], float)
    assert cfg.resources.rollout.num_cpus == 0.5  # set before, untouched
    assert cfg.resources.learner.custom == {}


@pytest.mark.parametrize(
    "key, text, expected",
    [
        ("ppo.epochs", "2.0", 2),  # an integral float is accepted for an int
        ("ppo.clip_ratio", "1", 1.0),  # an int is accepted for a float
        ("model.gradient_checkpointing", "true", True),
        ("rollout.stop_token_ids", "[5, 6]", (5, 6)),
        ("learner.adam_betas", "[0.8, 0.99]", (0.8, 0.99)),
        ("name", "123", "123"),  # a str field keeps the text as given
        ("rollout.top_k", "-1", -1),
    ],
)
def test_override_values_are_converted_to_the_field_type(key, text, expected):
    value = get_path(_load([f"--{key}", text]), key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text", ["none", "null", "~", "None", ""])
def test_none_spellings_unset_an_optional_field(text):
    cfg = _load(["--ppo.kl_target", "0.05", "--ppo.value_clip", text])
    assert cfg.ppo.value_clip is None
    assert cfg.ppo.kl_target == 0.05


def test_none_in_yaml_unsets_an_optional_field(tmp_path):
    path = _write_yaml(tmp_path, "ppo: {value_clip: null}\nmodel: {build_tiny: null}\n")
    cfg = load_config(path)
    assert cfg.ppo.value_clip is None
    assert cfg.model.build_tiny is None


def test_none_for_a_required_field_is_a_type_error():
    with pytest.raises(ConfigError, match=r"ppo\.epochs: expected int, got 'none'"):
        _load(["--ppo.epochs", "none"])


def test_unsetting_the_reward_function_is_reported_with_the_flag():
    with pytest.raises(ConfigError, match="--reward.kind function needs --reward.function"):
        _load(["--reward.function", "null"])


# ---- errors: unknown keys, wrong types ---------------------------------------------


def test_unknown_leaf_key_suggests_the_close_match():
    with pytest.raises(ConfigError) as err:
        _load(["--ppo.clip_ratoi", "0.3"])
    msg = str(err.value)
    assert "unknown config key 'ppo.clip_ratoi'" in msg
    assert "Did you mean 'clip_ratio'?" in msg
    assert "Valid keys here: iterations, epochs, mini_batches, clip_ratio," in msg


def test_unknown_section_suggests_the_close_match():
    with pytest.raises(ConfigError, match=r"unknown config key 'ppoo'\. Did you mean 'ppo'\?"):
        _load(["--ppoo.clip_ratio", "0.3"])


def test_unknown_nested_key_names_the_full_path(tmp_path):
    path = _write_yaml(tmp_path, "resources:\n  learner: {num_cpu: 1}\n")
    with pytest.raises(ConfigError, match=r"'resources\.learner\.num_cpu'\. Did you mean 'num_cpus'\?"):
        load_config(path)


def test_unknown_key_without_a_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as err:
        _load(["--ppo.zzzzzz", "1"])
    assert "Did you mean" not in str(err.value)
    assert "Valid keys here:" in str(err.value)


@pytest.mark.parametrize(
    "key, text, message",
    [
        ("ppo.epochs", "abc", "ppo.epochs: expected int, got 'abc'."),
        ("ppo.epochs", "2.5", "ppo.epochs: expected int, got 2.5."),
        ("ppo.clip_ratio", "true", "ppo.clip_ratio: expected float, got True."),  # bool is not a number here
        ("model.value_grad_to_body", "1", "model.value_grad_to_body: expected bool, got 1."),
        ("rollout.stop_token_ids", "5", "rollout.stop_token_ids: expected tuple, got 5."),
        ("learner.adam_betas", "[0.9]", "learner.adam_betas: expected 2 values, got 1."),
        ("resources.rollout.custom", "[1]", "resources.rollout.custom: expected dict, got [1]."),
        ("resources.rollout.custom", "{a: x}", "resources.rollout.custom.a: expected float, got 'x'."),
    ],
)
def test_wrong_types_name_the_key_and_value(key, text, message):
    with pytest.raises(ConfigError) as err:
        _load([f"--{key}", text])
    assert str(err.value) == message


def test_unparsable_value_is_a_config_error():
    with pytest.raises(ConfigError, match=r"resources\.rollout\.custom: cannot parse '\{a: 1'"):
        _load(["--resources.rollout.custom", "{a: 1"])


def test_override_below_a_leaf_value_is_an_error():
    with pytest.raises(ConfigError, match=r"ppo\.clip_ratio: expected float, got \{'x': '1'\}"):
        _load(["--ppo.clip_ratio.x", "1"])


def test_override_into_a_section_that_the_yaml_set_to_a_value(tmp_path):
    path = _write_yaml(tmp_path, "ppo: 3\n")
    with pytest.raises(ConfigError, match=r"--ppo\.epochs: 'ppo' is a value, not a section"):
        _load(["--ppo.epochs", "2"], path)


def test_missing_file_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass an existing YAML"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, got list"):
        load_config(str(listed))


def test_empty_yaml_file_is_the_default_config(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(str(empty)) == Config()


def test_gradient_checkpointing_is_decided_by_memory_unless_set():
    assert _load([]).model.gradient_checkpointing is None
    assert _load(["--model.gradient_checkpointing", "true"]).model.gradient_checkpointing is True
    assert _load(["--model.gradient_checkpointing", "null"]).model.gradient_checkpointing is None


# ---- immutability ---------------------------------------------------------------


def test_config_is_frozen_at_every_level():
    cfg = load_config(DEMO)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ppo.clip_ratio = 0.3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.resources.learner.num_cpus = 2.0  # type: ignore[misc]
    assert isinstance(cfg.rollout.stop_token_ids, tuple)
    assert isinstance(cfg.learner.adam_betas, tuple)


def test_custom_resources_cannot_be_mutated():
    cfg = _load(["--resources.rollout.custom", "{node_a: 1}"])
    with pytest.raises(TypeError):
        cfg.resources.rollout.custom["node_a"] = 5.0  # type: ignore[index]
    assert cfg.resources.rollout.custom["node_a"] == 1.0


def test_loading_does_not_mutate_the_override_mapping():
    overrides = {"ppo.clip_ratio": "0.3"}
    load_config(DEMO, overrides)
    assert overrides == {"ppo.clip_ratio": "0.3"}


# ---- dict round trip ------------------------------------------------------------


def test_config_to_dict_round_trips_through_config_from_dict():
    cfg = _load([
        "--rollout.stop_token_ids", "[7, 9]", "--resources.rollout.custom", "{node_a: 1, accel: 0.5}",
        "--ppo.value_clip", "none", "--ppo.kl_target", "0.1", "--learner.adam_betas", "[0.8, 0.9]",
        "--model.build_tiny", "qwen2",
    ])
    plain = config_to_dict(cfg)
    assert plain["rollout"]["stop_token_ids"] == [7, 9]  # tuples become lists
    assert plain["resources"]["rollout"]["custom"] == {"node_a": 1.0, "accel": 0.5}
    assert plain["ppo"]["value_clip"] is None
    assert config_from_dict(plain) == cfg
    # and through a YAML file, as a run directory's config would be reloaded
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(plain))) == cfg


def test_config_from_dict_does_not_validate_but_load_config_does():
    cfg = config_from_dict({"ppo": {"epochs": 0}})
    assert cfg.ppo.epochs == 0
    with pytest.raises(ConfigError, match="--ppo.epochs must be > 0"):
        validate(cfg)


# ---- bugs found ---------------------------------------------------------------


def test_scientific_notation_override_is_a_float():
    assert _load(["--learner.lr", "1e-5"]).learner.lr == 1e-5


def test_scientific_notation_in_yaml_is_a_float(tmp_path):
    path = _write_yaml(tmp_path, "learner:\n  lr: 3e-4\n")
    assert load_config(path).learner.lr == 3e-4


def test_scientific_notation_with_a_dot_is_a_float():
    assert _load(["--learner.lr", "1.0e-5"]).learner.lr == 1e-5



def test_config_with_custom_resources_survives_pickle():
    """Ray pickles the config for every actor; a frozen mapping must survive the round trip."""
    import pickle

    cfg = _load(["--resources.rollout.custom", "{node_a: 1}"])
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and back.resources.rollout.custom == {"node_a": 1.0}
    with pytest.raises(TypeError):
        back.resources.rollout.custom["node_a"] = 2.0  # type: ignore[index]

