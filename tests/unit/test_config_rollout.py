"""The rollout section: rollout.backend, the vLLM-only settings under rollout.vllm, and the
loader's error for a key that moved there (YAML and command line), which names the new key."""

from __future__ import annotations

import pytest

from rlhf_ray.config import ConfigError, load_config

# (key, a value as text, that value loaded: each differs from the default)
MOVED = [("gpu_memory_utilization", "0.9", 0.9), ("kv_cache_gib", "2", 2.0), ("enforce_eager", "false", False)]


@pytest.mark.parametrize("key, value, _", MOVED)
def test_an_old_flat_key_on_the_command_line_names_its_new_place(key, value, _):
    with pytest.raises(ConfigError) as info:
        load_config(None, {f"rollout.{key}": value})
    msg = str(info.value)
    assert msg.startswith(f"config key 'rollout.{key}' has moved to 'rollout.vllm.{key}': only the vllm rollout "
                          "backend reads it"), msg
    assert f"on the command line write --rollout.vllm.{key} instead of --rollout.{key}" in msg


def test_an_old_flat_key_in_yaml_shows_the_nested_form(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("rollout:\n  num_engines: 1\n  gpu_memory_utilization: 0.85\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).endswith("in a YAML file move the key under 'rollout.vllm':\n"
                                    "rollout:\n  vllm:\n    gpu_memory_utilization: <value>")


@pytest.mark.parametrize("key, value, loaded", MOVED)
def test_the_new_keys_load(key, value, loaded, tmp_path):
    cfg = load_config(None, {f"rollout.vllm.{key}": value})
    assert getattr(cfg.rollout.vllm, key) == loaded and type(getattr(cfg.rollout.vllm, key)) is type(loaded)
    path = tmp_path / "new.yaml"
    path.write_text(f"rollout:\n  backend: vllm\n  vllm:\n    {key}: {value}\n")
    assert load_config(str(path)).rollout.vllm == cfg.rollout.vllm


@pytest.mark.parametrize("overrides, error", [
    ({"rollout.vllm.gpu_memory_utilization": "1.5"},
     "--rollout.vllm.gpu_memory_utilization must be in (0, 1] (got 1.5): it is the fraction of GPU memory vLLM "
     "may take."),
    ({"rollout.vllm.kv_cache_gib": "1.5"},
     "--rollout.vllm.kv_cache_gib must be a whole number >= 1 (got 1.5): vLLM's CPU build reads its KV-cache size in "
     "whole GiB (VLLM_CPU_KVCACHE_SPACE)"),
    ({"rollout.vllm.kv_cache_gib": "0"}, "--rollout.vllm.kv_cache_gib must be a whole number >= 1 (got 0.0)"),
    ({"rollout.backend": "sglang"}, "--rollout.backend is 'sglang'; choose one of ['vllm']."),
])
def test_the_rollout_section_refuses(overrides, error):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert error in str(info.value)
