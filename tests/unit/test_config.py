"""The config tree: YAML + dotted overrides, types, validation, derived sizes, docs, CLI.

Everything here runs before Ray would start, so none of it may import or start Ray; the
launch tests run ``python -m rlhf_ray.launch`` in a subprocess to check exactly that.
"""

import dataclasses
import json
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import (
    Config,
    ConfigError,
    PPOConfig,
    RoleResources,
    Sizes,
    config_from_dict,
    config_to_dict,
    get_path,
    iter_fields,
    load_config,
    parse_overrides,
    resolve,
    validate,
)
from rlhf_ray.coordinator.placement import placement_plan

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


# ---- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, choices",
    [
        ("model.dtype", "float16", "['float32', 'bfloat16']"),
        ("model.build_tiny", "gpt2", "[None, 'llama', 'qwen2']"),
        ("data.too_long", "keep", "['drop', 'truncate', 'error']"),
        ("ppo.kl_estimator", "k4", "['k1', 'k2', 'k3']"),
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


# ---- derived sizes ---------------------------------------------------------------


def test_default_sizes():
    assert validate(Config()) == Sizes(
        samples_per_iteration=64, samples_per_rank=32, mini_batch_size=32, mini_batch_per_rank=16,
        grad_accum_steps=4, optimizer_steps_per_iteration=2, prompts_per_engine=8,
    )


def test_sizes_of_a_non_trivial_config():
    cfg = config_from_dict({
        "rollout": {"prompts_per_iteration": 6, "samples_per_prompt": 4, "num_engines": 3},
        "ppo": {"mini_batches": 3, "epochs": 2},
        "learner": {"num_ranks": 2, "micro_batch_size": 2},
    })
    # 24 samples; 12 per rank; mini-batches of 8 = 4 per rank = 2 micro-batches of 2.
    assert resolve(cfg) == Sizes(24, 12, 8, 4, 2, 6, 2)


@pytest.mark.parametrize(
    "overrides, problem, flags",
    [
        (["--learner.num_ranks", "3"], "samples per iteration / learner ranks: 64 is not divisible by 3",
         "--rollout.prompts_per_iteration, --rollout.samples_per_prompt or --learner.num_ranks"),
        (["--ppo.mini_batches", "3"], "samples per iteration / mini-batches: 64 is not divisible by 3",
         "--rollout.prompts_per_iteration, --rollout.samples_per_prompt or --ppo.mini_batches"),
        (["--ppo.mini_batches", "32", "--learner.micro_batch_size", "1", "--learner.num_ranks", "4",
          "--rollout.samples_per_prompt", "4"],
         "mini-batch / learner ranks: 1 is not divisible by 4", "--ppo.mini_batches or --learner.num_ranks"),
        (["--learner.micro_batch_size", "5"], "per-rank mini-batch / micro-batch: 16 is not divisible by 5",
         "--learner.micro_batch_size or --ppo.mini_batches"),
        (["--rollout.num_engines", "3"], "prompts per iteration / engines: 8 is not divisible by 3",
         "--rollout.prompts_per_iteration or --rollout.num_engines"),
    ],
)
def test_inexact_division_names_the_flags(overrides, problem, flags):
    with pytest.raises(ConfigError) as err:
        _load(overrides)
    assert f"{problem}; change {flags}." in str(err.value)


def test_token_budget_replaces_the_micro_batch_division():
    # 16 sequences per rank per step do not divide into micro-batches of 5, but with a token
    # budget micro-batches are sized at run time and DeepSpeed's accumulation count is nominal.
    cfg = _load(["--learner.micro_batch_size", "5", "--learner.micro_batch_tokens", "512"])
    assert resolve(cfg).grad_accum_steps == 1
    with pytest.raises(ConfigError, match="micro_batch_tokens and --learner.forward_max_tokens must be >= 0"):
        _load(["--learner.micro_batch_tokens", "-1"])


def test_gradient_checkpointing_is_decided_by_memory_unless_set():
    assert _load([]).model.gradient_checkpointing is None
    assert _load(["--model.gradient_checkpointing", "true"]).model.gradient_checkpointing is True
    assert _load(["--model.gradient_checkpointing", "null"]).model.gradient_checkpointing is None


def test_resolve_raises_config_error_which_is_a_value_error():
    cfg = config_from_dict({"learner": {"num_ranks": 3}})
    with pytest.raises(ValueError, match="batch sizes do not divide"):
        resolve(cfg)


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


# ---- docs and CLI fields -----------------------------------------------------------


def _leaf_names(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_names(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_iter_fields_yields_every_leaf_once_in_order():
    names = [name for name, _, _, _ in iter_fields()]
    assert names == _leaf_names(Config)
    assert len(names) == len(set(names))
    assert "resources.rollout.custom" in names and "resources.rollout" not in names


def test_every_leaf_field_has_a_doc():
    undocumented = [name for name, _, _, doc in iter_fields() if not doc.strip()]
    assert undocumented == []


def test_iter_fields_types_defaults_and_docs():
    fields = {name: (tp, default, doc) for name, tp, default, doc in iter_fields()}
    assert fields["ppo.clip_ratio"][:2] == (float, 0.2)
    assert fields["ppo.clip_ratio"][2].startswith("PPO clip epsilon")
    assert fields["ppo.kl_target"][:2] == (float | None, None)
    assert fields["resources.rollout.custom"][:2] == (dict[str, float], {})
    assert "{node_a: 1}" in fields["resources.rollout.custom"][2]
    assert fields["seed"] == (int, 0, "Seed for data order, sampling and initialisation.")


def test_every_cli_field_is_accepted_back_as_an_override_with_its_default():
    tree: dict = {}
    for name, _, default, _ in iter_fields():
        node = tree
        *sections, leaf = name.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = list(default) if isinstance(default, tuple) else default
    assert config_from_dict(tree) == Config()


def test_ppo_docs_come_from_the_string_under_each_field():
    docs = {name: doc for name, _, _, doc in iter_fields(PPOConfig)}
    assert docs["gamma"] == "GAE discount."
    assert docs["lam"] == "GAE lambda."


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


def test_log_every_zero_is_rejected_before_the_run():
    with pytest.raises(ConfigError, match="--logging.log_every"):
        _load(["--logging.log_every", "0"])


# ---- the launcher (subprocess: must not start or even import Ray) -----------------


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_ray.launch", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_launch_dry_run_prints_the_plan_and_exits_0():
    result = _launch("--config", "configs/demo_cpu.yaml", "--dry-run", "--ppo.clip_ratio=0.3",
                     "--resources.rollout.custom", "{node_a: 1}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    cfg = load_config(DEMO, {"ppo.clip_ratio": "0.3", "resources.rollout.custom": "{node_a: 1}"})
    printed_config = json.loads(out.split("\n\nsizes:")[0])
    assert printed_config == config_to_dict(cfg)
    assert printed_config["ppo"]["clip_ratio"] == 0.3
    assert f"sizes: {json.dumps(resolve(cfg).__dict__)}\n" in out
    assert "placement plan (one placement group per role):" in out
    plan_lines = out.split("placement plan (one placement group per role):\n")[1].splitlines()
    assert plan_lines == ["  " + p.describe() for p in placement_plan(cfg)]
    assert [line.split()[0] for line in plan_lines] == ["rollout", "reference", "reward", "learner"]
    assert "node_a=1" in plan_lines[0]
    assert "Ray dashboard" not in out + result.stderr


def test_launch_bad_override_exits_2_with_the_message():
    result = _launch("--config", "configs/demo_cpu.yaml", "--dry-run", "--ppo.epochs", "abc")
    assert result.returncode == 2
    assert "error: ppo.epochs: expected int, got 'abc'." in result.stderr
    assert result.stdout == ""


def test_launch_invalid_config_exits_2_naming_the_flags():
    result = _launch("--config", "configs/demo_cpu.yaml", "--dry-run", "--rollout.prompts_per_iteration", "8",
                     "--rollout.samples_per_prompt", "8", "--learner.num_ranks", "3")
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid config:")
    assert ("samples per iteration / learner ranks: 64 is not divisible by 3; change "
            "--rollout.prompts_per_iteration, --rollout.samples_per_prompt or --learner.num_ranks.") in result.stderr
    assert result.stdout == ""


def test_launch_dry_run_imports_no_heavy_package():
    child = textwrap.dedent(
        """
        import runpy, sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ray", "vllm", "deepspeed", "transformers"):
                    raise ImportError("blocked: " + name)

        sys.meta_path.insert(0, Blocker())
        sys.argv = ["rlhf_ray.launch", "--config", "configs/demo_cpu.yaml", "--dry-run"]
        try:
            runpy.run_module("rlhf_ray.launch", run_name="__main__")
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        """
    )
    result = subprocess.run([sys.executable, "-c", child], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "learner    x2" in result.stdout


def test_config_with_custom_resources_survives_pickle():
    """Ray pickles the config for every actor; a frozen mapping must survive the round trip."""
    import pickle

    cfg = _load(["--resources.rollout.custom", "{node_a: 1}"])
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and back.resources.rollout.custom == {"node_a": 1.0}
    with pytest.raises(TypeError):
        back.resources.rollout.custom["node_a"] = 2.0  # type: ignore[index]


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
