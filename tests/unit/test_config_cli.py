"""The config's CLI side: field docs (the ``--help`` text), and the launcher's dry run in a
subprocess, which must not start or even import Ray."""

import dataclasses
import json
import subprocess
import sys
import textwrap
import typing

from rlhf_ray.config import Config, PPOConfig, config_from_dict, config_to_dict, iter_fields, load_config, resolve
from rlhf_ray.runtime.placement import placement_plan
from tests.unit.test_config import DEMO, REPO_ROOT

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
    assert docs["lam"] == "GAE lambda of the advantages (and of the value targets unless ppo.lam_critic is set)."


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


def test_help_lists_every_field_with_its_doc():
    result = _launch("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse keeps the docs' own line breaks
    for name, _, default, doc in iter_fields():
        assert f"--{name} {' '.join(doc.split())} (default: {default!r})" in text, name


def test_config_package_imports_only_the_standard_library():
    child = textwrap.dedent(
        """
        import sys

        before = set(sys.modules)
        import rlhf_ray.config
        from rlhf_ray.config import iter_fields, load_config

        list(iter_fields())
        new = {name.split(".")[0] for name in set(sys.modules) - before}
        print(sorted(new - set(sys.stdlib_module_names) - {"rlhf_ray"}))
        """
    )
    result = subprocess.run([sys.executable, "-c", child], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # not even yaml: it is imported when a file or value is read
