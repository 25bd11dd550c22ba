"""Config trees of SFT, RM and the pipeline: exact division, clear errors, help text, and entry
points that reject bad input before any Ray cluster starts."""

from __future__ import annotations

import os

import pytest

from rlhf_ray.config import ConfigError, iter_fields, load_config
from rlhf_ray.supervised.config import (
    PipelineConfig,
    RMRunConfig,
    SFTRunConfig,
    resolve_trainer,
    validate_pipeline,
    validate_rm,
    validate_sft,
)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _sft(**overrides):
    return load_config(None, {k: str(v) for k, v in overrides.items()}, cls=SFTRunConfig, validator=validate_sft)


def test_shipped_configs_load():
    sft = load_config(os.path.join(CONFIGS, "sft_cpu.yaml"), cls=SFTRunConfig, validator=validate_sft)
    rm = load_config(os.path.join(CONFIGS, "rm_cpu.yaml"), cls=RMRunConfig, validator=validate_rm)
    pipe = load_config(os.path.join(CONFIGS, "pipeline_cpu.yaml"), cls=PipelineConfig, validator=validate_pipeline)
    assert rm.model.path == sft.train.output_dir  # the RM starts from the SFT model
    assert pipe.ppo.model.path == pipe.sft.train.output_dir and pipe.ppo.reward.model_path == pipe.rm.train.output_dir
    assert pipe.ppo.reward.kind == "model"


def test_sizes_divide_exactly():
    sizes = resolve_trainer(_sft(**{"train.batch_size": 32, "learner.num_ranks": 2, "learner.micro_batch_size": 4}))
    assert (sizes.per_rank_batch, sizes.grad_accum_steps) == (16, 4)
    with pytest.raises(ConfigError, match=r"--train.batch_size 33 is not divisible by --learner.num_ranks 2"):
        _sft(**{"train.batch_size": 33})
    with pytest.raises(ConfigError, match=r"per-rank batch 16 .* not divisible by --learner.micro_batch_size 5"):
        _sft(**{"train.batch_size": 32, "learner.micro_batch_size": 5})


def test_errors_are_listed_together():
    with pytest.raises(ConfigError) as err:
        _sft(**{"data.too_long": "cut", "data.eval_fraction": 1.5, "learner.value_head_lr": 0.1, "train.epochs": 0})
    msg = str(err.value)
    for needle in ("--data.too_long is 'cut'", "--data.eval_fraction must be in [0, 1)",
                   "--learner.value_head_lr has no effect", "--train.epochs must be > 0"):
        assert needle in msg


def test_rm_needs_a_held_out_set_and_two_fields():
    with pytest.raises(ConfigError, match="held-out pairwise accuracy"):
        load_config(None, {"data.eval_fraction": "0"}, cls=RMRunConfig, validator=validate_rm)
    with pytest.raises(ConfigError, match="both 'x'"):
        load_config(None, {"data.chosen_field": "x", "data.rejected_field": "x"}, cls=RMRunConfig,
                    validator=validate_rm)
    with pytest.raises(ConfigError, match="unknown config key 'data.response_field'"):
        load_config(None, {"data.response_field": "r"}, cls=RMRunConfig, validator=validate_rm)


def test_pipeline_wiring_is_checked_not_rewritten():
    path = os.path.join(CONFIGS, "pipeline_cpu.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path, {"sft.train.output_dir": "elsewhere", "ppo.reward.kind": "function",
                           "stages": "[ppo, rm, sft]"}, cls=PipelineConfig, validator=validate_pipeline)
    msg = str(err.value)
    assert "--ppo.model.path 'artifacts/pipeline/sft' is not the SFT output --sft.train.output_dir 'elsewhere'" in msg
    assert "--ppo.reward.kind model" in msg and "in that order" in msg
    with pytest.raises(ConfigError, match=r"ppo: --ppo.iterations must be > 0"):
        load_config(path, {"ppo.ppo.iterations": "0"}, cls=PipelineConfig, validator=validate_pipeline)


def test_every_field_is_documented():
    for cls in (SFTRunConfig, RMRunConfig, PipelineConfig):
        undocumented = [name for name, _, _, doc in iter_fields(cls) if not doc]
        # The PPO tree's top-level name/seed live in config.py; everything of ours has a doc.
        assert not [n for n in undocumented if not n.startswith("ppo.")], undocumented


def test_entry_points_reject_bad_input_before_ray(tmp_path, capsys):
    from rlhf_ray import train_rm, train_sft
    from rlhf_ray.tiny_models import build_tiny_model

    model = str(build_tiny_model(tmp_path / "m", kind="causal_lm"))
    missing = str(tmp_path / "missing.jsonl")
    assert train_sft.main(["--model.path", model, "--data.train_path", missing]) == 2
    assert "does not exist; set --data.train_path" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert train_rm.main(["--model.path", model, "--data.train_path", str(empty)]) == 2
    assert "holds no records" in capsys.readouterr().err
    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "a", "response": " b"}\n' * 10)
    assert train_sft.main(["--model.path", model, "--data.train_path", str(few)]) == 2
    assert "fewer than one optimiser step (--train.batch_size 32)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_sft.main(["--train.batch_size", "3"])
    assert "not divisible" in capsys.readouterr().err
    assert train_sft.main(["--dry-run"]) == 0
    assert '"per_rank_batch": 16' in capsys.readouterr().out


def test_trainer_checkpoint_settings_are_checked():
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 0"):
        _sft(**{"train.checkpoint_every": -1})
    with pytest.raises(ConfigError, match="checkpoint_keep_last must be > 0"):
        _sft(**{"train.checkpoint_keep_last": 0})


def test_resume_point_picks_the_newest_complete_checkpoint_and_refuses_other_settings(tmp_path):
    import json

    from rlhf_ray.supervised.run import resume_point

    cfg = _sft(**{"train.output_dir": tmp_path, "train.resume": "true", "learner.num_ranks": 2,
                  "train.batch_size": 32})
    assert resume_point(cfg) is None  # nothing saved yet: start from model.path
    position = {"epoch": 2, "next_step": 3, "global_step": 14, "world_size": 2, "batch_size": 32, "seed": 0,
                "shuffle": True}
    for step, complete in ((9, True), (14, True), (15, False)):  # step 15 was cut off while saving
        d = tmp_path / "checkpoints" / (f"step_{step:06d}" + ("" if complete else ".tmp"))
        d.mkdir(parents=True)
        (d / "position.json").write_text(json.dumps({**position, "global_step": step}))
        if complete:
            (d / "COMPLETE").write_text("done\n")
    path, found = resume_point(cfg)
    assert os.path.basename(path) == "step_000014" and found["global_step"] == 14
    other = _sft(**{"train.output_dir": tmp_path, "train.resume": "true", "learner.num_ranks": 1,
                    "train.batch_size": 32, "seed": 5})
    with pytest.raises(ConfigError, match=r"world_size 2 then, 1 now; .*seed 0 then, 5 now"):
        resume_point(other)
    # a position from before learner.backend existed was written by DeepSpeed: its state is not FSDP2's
    fsdp2 = _sft(**{"train.output_dir": tmp_path, "train.resume": "true", "learner.num_ranks": 2,
                    "train.batch_size": 32, "learner.backend": "fsdp2"})
    with pytest.raises(ConfigError, match=r"backend 'deepspeed' then, 'fsdp2' now"):
        resume_point(fsdp2)


def test_total_steps_is_the_schedule_horizon():
    from rlhf_ray.supervised.run import total_steps

    cfg = _sft(**{"train.epochs": 2, "train.batch_size": 32})
    assert total_steps(cfg, 360) == 22  # 11 full batches per epoch; the partial one is skipped
    assert total_steps(_sft(**{"train.epochs": 2, "train.batch_size": 32, "train.max_steps": 7}), 360) == 7
    with pytest.raises(ConfigError, match="lr_schedule"):
        _sft(**{"learner.lr_schedule": "step"})


def test_ppo_learner_options_are_refused_not_ignored():
    with pytest.raises(ConfigError) as err:
        _sft(**{"learner.micro_batch_tokens": 512, "learner.forward_max_tokens": 256})
    assert "--learner.micro_batch_tokens has no effect in SFT/RM training" in str(err.value)
    assert "--learner.forward_max_tokens has no effect in SFT/RM training" in str(err.value)
