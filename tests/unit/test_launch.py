"""The launcher's own behaviour before Ray starts: one message per input error (the traceback only
with --debug), and no run directory inside Ray's temporary copy of a job's working directory."""

from __future__ import annotations

import os

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.launch import main, run_dir_for


def test_a_relative_run_dir_inside_a_ray_job_copy_is_refused(tmp_path):
    cfg = load_config(None, {"name": "demo", "logging.run_dir": "runs/{name}-{time}"})
    job_copy = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_abc"
    with pytest.raises(ConfigError, match="inside the temporary copy of the working directory"):
        run_dir_for(cfg, cwd=job_copy)
    assert run_dir_for(cfg, cwd=str(tmp_path)).startswith(str(tmp_path) + os.sep + "runs" + os.sep + "demo-")
    absolute = load_config(None, {"name": "demo", "logging.run_dir": str(tmp_path / "{name}")})
    assert run_dir_for(absolute, cwd=job_copy) == str(tmp_path / "demo")  # an absolute one is fine


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from rlhf_ray.tiny_models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", arch="llama", seed=0))


def test_an_input_error_is_one_message_with_exit_code_2(model, tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    code = main(["--config", "configs/demo_cpu.yaml", "--model.path", model, "--model.build_tiny", "none",
                 "--data.prompts", str(bad), "--logging.run_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {bad}:2:") and "Traceback" not in err and "--debug" in err
    code = main(["--config", "configs/demo_cpu.yaml", "--model.path", model, "--model.build_tiny", "none",
                 "--data.prompts", str(bad), "--logging.run_dir", str(tmp_path / "run"), "--debug"])
    assert code == 2 and "Traceback" in capsys.readouterr().err


def test_a_run_stopped_by_a_lost_node_is_one_message_with_exit_code_1(tmp_path, capsys, monkeypatch):
    from rlhf_ray.coordinator import run as run_module
    from rlhf_ray.coordinator.recovery import NodeLostError

    def lost(*args, **kwargs):
        raise NodeLostError("node 10.77.0.2 (Ray node 5e1f) was lost with learner rank 0 on it: ...")

    monkeypatch.setattr(run_module, "run", lost)  # what run() raises once Recovery gives up on the node
    code = main(["--config", "configs/demo_cpu.yaml", "--logging.run_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: node 10.77.0.2 (Ray node 5e1f) was lost") and "Traceback" not in err


def test_roles_that_do_not_fit_the_cluster_are_one_message_with_exit_code_2(tmp_path, capsys, monkeypatch):
    from rlhf_ray.coordinator import run as run_module
    from rlhf_ray.runtime.placement import PlacementError

    def too_big(*args, **kwargs):
        raise PlacementError("the roles do not fit on this cluster:\n  CPU: plan needs 2.5, cluster has 2")

    monkeypatch.setattr(run_module, "run", too_big)  # what run() raises from check_fits, before any actor
    code = main(["--config", "configs/demo_cpu.yaml", "--logging.run_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: the roles do not fit on this cluster:") and "Traceback" not in err
