"""Every shipped config runs in CI as its CPU twin (tests/twins.py): the file's own options, scaled
down, with only what needs a GPU or the user's files swapped (printed by each test).

The GPU config's twin runs 2 ZeRO-3 bf16 learner ranks with token budgets that split the ranks'
no-grad passes unevenly, 2 engines with the collective sync, a reward model, evaluation and
checkpoints: the settings that hung in an earlier version never ran anywhere before.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.twins import CONFIGS, TWINS

pytestmark = pytest.mark.integration

PPO_TWINS = sorted(name for name, twin in TWINS.items() if twin.entry == "ppo")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, str]:
    from rlhf_ray.data.demo_data import write_demo_data

    return write_demo_data(str(tmp_path_factory.mktemp("demo")), seed=0, n_sft=200, n_pairs=200, n_prompts=16)


@pytest.mark.parametrize("name", PPO_TWINS)
def test_ppo_config_twin_runs(ppo_twin_run, name, capsys):
    """Each twin runs once per session (tests/integration/conftest.py's ``ppo_twin_run``); the demo's
    run is checked more closely, row by row, in tests/integration/test_ppo_system.py."""
    with capsys.disabled():
        print(f"\n{name} twin, swapped:\n{TWINS[name].describe()}")
    cfg, summary, run_dir = ppo_twin_run(name)
    assert summary["completed"] and summary["iterations"] == cfg.ppo.iterations == 3
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["samples"] == cfg.rollout.prompts_per_iteration * cfg.rollout.samples_per_prompt
        for key in ("policy_loss", "grad_norm", "kl_mean", "reward_mean"):
            assert math.isfinite(r[key]), (name, key)
    every = cfg.eval.every
    if every:  # evaluation fired before training and on its cadence
        evals = [json.loads(line)["iteration"] for line in open(os.path.join(run_dir, "eval.jsonl"))]
        assert 0 in evals and every in evals, evals
    saved = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert f"iter_{cfg.checkpoint.every:06d}" in saved or cfg.checkpoint.every == 0, saved


@pytest.mark.parametrize("name", sorted(n for n, t in TWINS.items() if t.entry in ("sft", "rm")))
def test_supervised_config_twin_runs(ray_cluster, tiny_llama, demo, tmp_path, name, capsys):
    from rlhf_ray import train_rm, train_sft

    twin = TWINS[name]
    out = tmp_path / "out"
    overrides = twin.overrides(policy=tiny_llama, sft_data=demo["sft.jsonl"], pref_data=demo["preference.jsonl"],
                               out=str(out))
    argv = ["--config", str(CONFIGS / name)] + [x for k, v in overrides.items() for x in (f"--{k}", v)]
    with capsys.disabled():
        print(f"\n{name} twin, swapped:\n{twin.describe()}")
    entry = train_sft if twin.entry == "sft" else train_rm
    assert entry.main(argv) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] > 0
    assert (out / "config.json").is_file()
