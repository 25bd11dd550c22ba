"""scripts/gpu_check.sh from the repository alone: where DeepSpeed comes from (the environment, a
wheel folder, pip's index, or nowhere), the version it asks for (constraints.txt), and that the
checks still run without DeepSpeed, saying what they leave out.

The script runs for real in a copy of its repository files with ``PYTHON`` pointing at a fake
interpreter that records what it is asked: ``-m pip`` "installs" DeepSpeed into ``--target`` (a
``deepspeed`` folder) when the scenario allows it, ``import deepspeed`` succeeds when such a folder is
on PYTHONPATH (or the scenario says the environment has it), pytest and the benchmark only record.
No GPU, no pip, nothing is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys

args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"args": args, "pythonpath": os.environ.get("PYTHONPATH", "")}}) + "\\n")
paths = [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
has_ds = os.environ.get("FAKE_ENV_DS") == "1" or any(os.path.isdir(os.path.join(p, "deepspeed")) for p in paths)
if args[:1] == ["-c"]:
    if "import deepspeed" in args[1]:
        if not has_ds:
            sys.exit(1)
        if "__version__" in args[1]:
            print(os.environ.get("FAKE_DS_VERSION", "0.0.0"))
    else:
        print("python 3.12 | torch fake")
    sys.exit(0)
if args[:3] == ["-m", "pip", "install"]:
    if os.environ.get("FAKE_PIP_OK") != "1":
        print("ERROR: Could not find a version that satisfies the requirement", file=sys.stderr)
        sys.exit(1)
    os.makedirs(os.path.join(args[args.index("--target") + 1], "deepspeed"), exist_ok=True)
sys.exit(0)
"""


def _pin(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1].split("#")[0].strip()
    raise AssertionError(f"constraints.txt pins no {name}")


def _run(tmp_path: Path, *args: str, **fake: str):
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "gpu_check.sh", root / "scripts" / "gpu_check.sh")
    shutil.copy2(REPO / "constraints.txt", root / "constraints.txt")
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    log, out = tmp_path / "calls.jsonl", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DS_WHEELS")}
    env.update(PYTHON=str(python), FAKE_LOG=str(log), OUT=str(out), DS_SITE=str(tmp_path / "site"),
               GPU_CHECK_BUDGET_S="470", **fake)
    result = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), *args], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    return result, calls, summary, root


def _module_calls(calls, module: str) -> list[list[str]]:
    return [c["args"][2:] for c in calls if c["args"][:2] == ["-m", module]]


def test_no_wheel_folder_and_no_index_still_runs_the_tests_and_the_torch_benchmark(tmp_path):
    result, calls, summary, root = _run(tmp_path, str(tmp_path / "no-such-dir"))
    assert result.returncode == 0, result.stdout + result.stderr
    (pip,) = [c for c in _module_calls(calls, "pip") if "deepspeed" in " ".join(c)]
    assert f"deepspeed=={_pin('deepspeed')}" in pip
    assert pip[pip.index("-c") + 1] == str(root / "constraints.txt")
    (pytest_call,) = _module_calls(calls, "pytest")
    assert "-m" in pytest_call and "gpu" in pytest_call and "tests/gpu" in pytest_call
    (bench,) = _module_calls(calls, "benchmarks.learner_gpu")
    assert bench[bench.index("--stages") + 1] == "torch"
    assert "deepspeed does not import" in summary and "--prepare-wheels" in summary


def test_pips_index_gives_deepspeed_at_the_pinned_version(tmp_path):
    result, calls, summary, _ = _run(tmp_path, str(tmp_path / "no-such-dir"), FAKE_PIP_OK="1",
                                     FAKE_DS_VERSION=_pin("deepspeed"))
    assert result.returncode == 0, result.stdout + result.stderr
    installs = _module_calls(calls, "pip")
    assert [c for c in installs if f"deepspeed=={_pin('deepspeed')}" in c and "--no-deps" in c]
    assert [c for c in installs if "pydantic" in c and "hjson" in c]
    (bench,) = _module_calls(calls, "benchmarks.learner_gpu")
    assert "--stages" not in bench
    assert re.search(rf"\] deepspeed {re.escape(_pin('deepspeed'))}$", summary, flags=re.M), summary


def test_a_wheel_folder_is_installed_without_an_index(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / f"deepspeed-{_pin('deepspeed')}-py3-none-any.whl").write_bytes(b"")
    result, calls, _, _ = _run(tmp_path, str(wheels), FAKE_PIP_OK="1", FAKE_DS_VERSION=_pin("deepspeed"))
    assert result.returncode == 0, result.stdout + result.stderr
    (pip,) = _module_calls(calls, "pip")
    assert "--no-index" in pip and str(wheels / f"deepspeed-{_pin('deepspeed')}-py3-none-any.whl") in pip


def test_the_environments_own_deepspeed_is_used_and_a_version_off_the_pin_is_reported(tmp_path):
    result, calls, summary, _ = _run(tmp_path, FAKE_ENV_DS="1", FAKE_DS_VERSION="0.1.0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _module_calls(calls, "pip") == []
    assert f"deepspeed 0.1.0 (constraints.txt pins {_pin('deepspeed')}" in summary
    (bench,) = _module_calls(calls, "benchmarks.learner_gpu")
    assert "--stages" not in bench


def test_prepare_wheels_reads_the_versions_from_constraints(tmp_path):
    result, calls, _, root = _run(tmp_path, "--prepare-wheels", str(tmp_path / "w"))
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = [c["args"][3:] for c in calls if c["args"][:3] == ["-m", "pip", "wheel"]]
    assert wheel[-1] == f"deepspeed=={_pin('deepspeed')}" and "--no-deps" in wheel
    (download,) = [c["args"][3:] for c in calls if c["args"][:3] == ["-m", "pip", "download"]]
    assert download[download.index("-c") + 1] == str(root / "constraints.txt")
    assert download[-2:] == ["pydantic", "hjson"] and "--only-binary=:all:" in download


def test_header_points_only_into_the_repository():
    name = "gpu_check.sh"
    header = [line for line in (REPO / "scripts" / name).read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "/work/" not in text and "FEASIBILITY" not in text, "the header names a file outside the repository"
    for word in text.replace("(", " ").replace(")", " ").replace(",", " ").split():
        if word.startswith(("scripts/", "tests/", "benchmarks/", "constraints.txt")):
            assert (REPO / word.rstrip(".;:").split(":")[0]).exists(), f"{name} names {word}, not in the repository"
