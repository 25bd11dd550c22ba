"""Every shipped config has a CPU twin that CI runs, and every twin is a loadable config."""

from __future__ import annotations

import pytest

from tests.twins import CONFIGS, TWINS, shipped_configs


def test_every_shipped_config_has_a_twin():
    missing = [name for name in shipped_configs() if name not in TWINS]
    assert not missing, f"configs without a CPU twin in tests/twins.py: {missing}"
    assert set(TWINS) <= set(shipped_configs()), "a twin of a config that is not shipped"


def test_the_gpu_config_named_in_deploy_is_twinned():
    assert "gpu_8x.yaml" in shipped_configs() and "gpu_8x.yaml" in TWINS


@pytest.mark.parametrize("name", sorted(TWINS))
def test_each_twin_loads_and_validates(name, tmp_path):
    from rlhf_ray.config import load_config
    from rlhf_ray.supervised.config import RMRunConfig, SFTRunConfig, validate_rm, validate_sft

    twin = TWINS[name]
    if twin.run_by:
        path, func = twin.run_by.split("::")
        text = (CONFIGS.parent / path).read_text()
        assert f"def {func}(" in text and name in text, twin.run_by
        return
    places = {k: str(tmp_path / k) for k in ("policy", "reward_model", "run_dir", "out", "sft_data", "pref_data")}
    kinds = {"ppo": {}, "sft": dict(cls=SFTRunConfig, validator=validate_sft),
             "rm": dict(cls=RMRunConfig, validator=validate_rm)}
    cfg = load_config(str(CONFIGS / name), twin.overrides(**places), **kinds[twin.entry])
    assert cfg is not None
    if name == "gpu_8x.yaml":  # the settings that matter on the GPUs are the file's own
        assert (cfg.learner.zero_stage, cfg.model.dtype, cfg.learner.packing, cfg.sync.transport) == \
            (3, "bfloat16", True, "collective")
        assert cfg.learner.forward_max_tokens > 0 and cfg.learner.micro_batch_tokens > 0
