"""Reaping the local Ray cluster a killed driver left behind (``coordinator/local_cluster.py``):
only the recorded processes of drivers that are gone, and only while their command line still
matches (a reused pid is left alone). Real processes, no Ray."""

from __future__ import annotations

import subprocess
import sys
import time

from rlhf_ray.coordinator import local_cluster as lc


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write(directory, driver_pid: int, procs: list[dict]) -> None:
    import json

    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"cluster-{driver_pid}.json").write_text(
        json.dumps({"driver_pid": driver_pid, "session_dir": None, "processes": procs}))


def test_the_processes_of_a_dead_driver_are_ended(tmp_path):
    orphan = _sleeper()
    time.sleep(0.2)
    _write(tmp_path, _dead_pid(), [{"pid": orphan.pid, "cmdline": lc._cmdline(orphan.pid)}])
    assert lc.reap_orphans(tmp_path, grace_s=5) == [orphan.pid]
    assert orphan.wait(timeout=10) is not None
    assert list(tmp_path.glob("cluster-*.json")) == []


def test_a_live_driver_and_a_reused_pid_are_left_alone(tmp_path):
    mine, other = _sleeper(), _sleeper()
    try:
        time.sleep(0.2)
        _write(tmp_path, mine.pid, [{"pid": other.pid, "cmdline": lc._cmdline(other.pid)}])  # driver alive
        dead = _dead_pid()
        _write(tmp_path / "b", dead, [{"pid": other.pid, "cmdline": "raylet --something-else"}])  # pid reused
        assert lc.reap_orphans(tmp_path) == [] and lc.reap_orphans(tmp_path / "b") == []
        assert other.poll() is None
        assert (tmp_path / f"cluster-{mine.pid}.json").exists()
    finally:
        mine.kill()
        other.kill()


def test_record_keeps_pid_and_command_line(tmp_path):
    p = _sleeper()
    try:
        time.sleep(0.2)
        path = lc.record([p.pid, _dead_pid()], "/tmp/session", tmp_path)
        import json

        rec = json.loads(path.read_text())
        assert [q["pid"] for q in rec["processes"]] == [p.pid]  # a pid already gone is not recorded
        assert "time.sleep(120)" in rec["processes"][0]["cmdline"]
    finally:
        p.kill()


def test_record_includes_the_children_of_the_recorded_processes(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "time.sleep(120)")])
    try:
        time.sleep(1.0)
        import json

        rec = json.loads(lc.record([parent.pid], None, tmp_path).read_text())
        assert len(rec["processes"]) == 2 and rec["processes"][0]["pid"] == parent.pid
        child = rec["processes"][1]["pid"]
        parent.kill()
        parent.wait()
        (tmp_path / "cluster-x.json").write_text(json.dumps({**rec, "driver_pid": _dead_pid()}))
        (tmp_path / f"cluster-{rec['driver_pid']}.json").unlink()
        assert lc.reap_orphans(tmp_path) == [child]  # the orphaned child is ended too
    finally:
        parent.kill()
