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
