"""Shared, session-wide fixtures for integration tests: one tiny model, one local Ray cluster.

Starting Ray and the engines dominates the cost of these tests, so every test that needs
them shares the same cluster and model directory.
"""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from rlhf_ray.tiny_models import ensure_tiny_model

    return str(ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", seed=0))


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray cluster (4 logical CPUs on any machine), shut down at the end."""
    ray = pytest.importorskip("ray")
    # Unix socket paths must stay short: a private temp dir directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory) -> str:
    """A tiny reward model with the tiny Llama's tokenizer (the GPU config's twin scores with it)."""
    from rlhf_ray.tiny_models import ensure_tiny_model

    return str(ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-rm", arch="llama", kind="reward", seed=1))


@pytest.fixture(scope="session")
def ppo_twin_run(ray_cluster, tiny_llama, tiny_reward_model, tmp_path_factory):
    """``ppo_twin_run(name)``: the CPU twin of ``configs/<name>`` (tests/twins.py) run once per session,
    as (config, summary, run directory). tests/integration/test_config_twins.py runs every PPO twin;
    tests/integration/test_ppo_system.py checks the demo's run more closely instead of starting the
    same roles again. A run that raised raises again for every test that asks for it."""
    from rlhf_ray.config import load_config
    from rlhf_ray.coordinator.run import run
    from tests.twins import CONFIGS, TWINS

    done: dict[str, tuple] = {}

    def get(name: str):
        if name not in done:
            run_dir = str(tmp_path_factory.mktemp("twin") / "run")
            cfg = load_config(str(CONFIGS / name), TWINS[name].overrides(policy=tiny_llama,
                                                                         reward_model=tiny_reward_model,
                                                                         run_dir=run_dir))
            try:
                done[name] = ((cfg, run(cfg, run_dir), run_dir), None)
            except Exception as exc:  # noqa: BLE001 - raised again below, for each test that asks
                done[name] = (None, exc)
        result, error = done[name]
        if error is not None:
            raise error
        return result

    return get


# The run that tests/integration/test_critic_warmup_system.py checks and test_checkpoint_resume.py
# resumes (``warmup_run``): 4 iterations, the first 2 a critic warm-up, one critic epoch after each
# PPO update, a checkpoint after every iteration (the last 2 kept), 16 built-in prompts (4 per
# iteration: the run ends where the second pass over the prompts begins).
WARMUP_RUN = {"ppo.critic_warmup_iterations": 2, "ppo.critic_epochs": 1, "checkpoint.every": 1,
              "checkpoint.keep_last": 2, "data.num_builtin_prompts": 16}


@pytest.fixture(scope="session")
def warmup_run(ray_cluster, tiny_llama, tmp_path_factory) -> tuple[dict, str, list[dict]]:
    """The ``WARMUP_RUN`` run, once per session (its roles start once for both files that need it):
    (summary, run directory, metrics rows as the run left them; the checkpoint test appends to the
    directory)."""
    import json

    from rlhf_ray.coordinator.run import run

    run_dir = str(tmp_path_factory.mktemp("warmup") / "run")
    summary = run(small_config(tiny_llama, **{**WARMUP_RUN, "ppo.iterations": 4}), run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return summary, run_dir, rows


# A warm-up and a cosine decay over a small_config run's 6 optimiser steps (2 per iteration), and
# the learning rate after each iteration: after iteration k the optimiser holds the lr of step
# 2(k+1), 0.1 + 0.45 (1 + cos(pi (2k+1)/5)) x 1e-3.
LR_SCHEDULE = {"learner.warmup_steps": 1, "learner.lr_schedule": "cosine", "learner.min_lr_ratio": 0.1}
LR_SCHEDULE_VALUES = [0.914058e-3, 0.410942e-3, 0.1e-3]


def check_ppo_rows(rows: list[dict], samples: int, evaluated: tuple[int, ...] = ()) -> None:
    """The metrics rows of a 3-iteration PPO run with a reference, a reward and a value head:
    on-policy first mini-batches, the engines in sync with the learner on every iteration, finite
    losses, timed phases, a sync after each update, and a policy that moves away from the reference.
    ``evaluated``: iterations with an evaluation before them, which synced the update itself (the
    sync is then the evaluation's, not in the row; the mismatch check still covers the row)."""
    import math

    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["samples"] == samples
        # First PPO mini-batch after a rollout is on-policy: ratio 1 (within float tolerance).
        assert r["onpolicy_ratio_dev"] < 1e-4, r["onpolicy_ratio_dev"]
        # Rollout (vLLM) and learner logprobs on the same tokens agree: weights are in sync.
        assert r["logprob_mismatch_max"] < 2e-3, r["logprob_mismatch_max"]
        for key in ("policy_loss", "value_loss", "entropy", "grad_norm", "kl_mean", "explained_variance"):
            assert math.isfinite(r[key]), key
        for phase in ("generate", "score", "advantages", "update"):
            assert r[f"time/{phase}"] > 0
    for r in rows[1:]:  # the update of iteration k is synced before the generation of k+1
        if r["iteration"] not in evaluated:
            assert r["time/sync"] > 0 and r["sync_bytes"] > 0
    # The policy moved away from the reference after the first update, and vLLM followed it
    # (the mismatch check above ran on those moved weights).
    assert rows[0]["kl_k2_mean"] < 1e-9  # before any update the policy is the reference
    assert rows[1]["kl_k2_mean"] > 1e-6 and rows[2]["kl_k2_mean"] > 1e-6


def small_config(model_path: str, **overrides):
    """The demo config shrunk for tests, with dotted overrides (``{"learner.zero_stage": 3}``)."""
    from rlhf_ray.config import load_config

    base = {
        "model.path": model_path, "model.build_tiny": "none",
        "rollout.prompts_per_iteration": 4, "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 8,
        "ppo.iterations": 3, "ppo.mini_batches": 2, "learner.micro_batch_size": 2,
        "learner.lr": 1e-3, "logging.tensorboard": True, "logging.progress_bar": False,
        "sync.check_logprobs_every": 1,  # the tests check the weight sync on every iteration
        "rollout.vllm.enforce_eager": True,  # ~3 s engine start instead of ~15 s of compiling
        "eval.every": 0,  # tests that evaluate turn it on
    }
    base.update(overrides)
    return load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo_cpu.yaml"),
                       {k: str(v) if not isinstance(v, str) else v for k, v in base.items()})
