"""Reaping the local Ray cluster a killed driver left behind (``runtime/local_cluster.py``):
only the recorded processes of drivers that are gone, and only while they are still the recorded
process (pid, start time, command line, our uid: a reused pid is left alone); records only from a
directory that is ours alone, never through symbolic links. Real processes, no Ray."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time

import pytest

from rlhf_ray.runtime import local_cluster as lc


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


def _entry(pid: int) -> dict:
    """A record's entry for the running process ``pid``, as ``record`` writes it."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        start = int(fh.read().rsplit(b")", 1)[1].split()[19])
    return {"pid": pid, "start": start, "cmdline": lc._cmdline(pid)}


def test_the_processes_of_a_dead_driver_are_ended(tmp_path):
    orphan = _sleeper()
    time.sleep(0.2)
    _write(tmp_path, _dead_pid(), [_entry(orphan.pid)])
    assert lc.reap_orphans(tmp_path, grace_s=5) == [orphan.pid]
    assert orphan.wait(timeout=10) is not None
    assert list(tmp_path.glob("cluster-*.json")) == []


def test_a_live_driver_and_a_reused_pid_are_left_alone(tmp_path):
    mine, other = _sleeper(), _sleeper()
    try:
        time.sleep(0.2)
        _write(tmp_path, mine.pid, [_entry(other.pid)])  # driver alive
        dead = _dead_pid()
        _write(tmp_path / "b", dead, [{**_entry(other.pid), "cmdline": "raylet --something-else"}])  # pid reused
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


# --------------------------------------------------------------------------- what is trusted


def test_record_creates_a_directory_only_we_can_enter(tmp_path):
    path = lc.record([], None, tmp_path / "records")
    assert path.parent == tmp_path / "records"
    assert stat.S_IMODE(os.stat(tmp_path / "records").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def _plant(kind: str, tmp_path, monkeypatch, entry: dict):
    """A records directory that is not ours alone, holding a record that names ``entry``."""
    real = tmp_path / "real"
    _write(real, _dead_pid(), [entry])
    if kind == "symlink":
        (tmp_path / "d").symlink_to(real)
        return tmp_path / "d", "a symbolic link"
    if kind == "file":
        (tmp_path / "d").write_text("")
        return tmp_path / "d", "not a directory"
    if kind == "other owner":  # as if another user had created it first
        uid = os.getuid()
        monkeypatch.setattr(lc.os, "getuid", lambda: uid + 1)
        return real, f"owned by uid {uid}, not by you"
    mode, who = {"group-writable": (0o775, "group"), "world-writable": (0o757, "others"),
                 "like /tmp": (0o1777, "group and others")}[kind]
    real.chmod(mode)
    return real, f"writable by {who}"


@pytest.mark.parametrize("kind", ["symlink", "file", "other owner", "group-writable", "world-writable",
                                  "like /tmp"])
def test_a_directory_that_is_not_ours_alone_is_refused_before_anything_is_signalled(kind, tmp_path, monkeypatch):
    victim = _sleeper()
    try:
        time.sleep(0.2)
        directory, why = _plant(kind, tmp_path, monkeypatch, _entry(victim.pid))
        with pytest.raises(ValueError, match=rf"refusing to use {re.escape(str(directory))} .*{why}.*TMPDIR"):
            lc.reap_orphans(directory, grace_s=1)
        assert victim.poll() is None  # nothing was signalled
        with pytest.raises(ValueError, match=f"refusing to use.*{why}"):
            lc.record([victim.pid], None, directory)
    finally:
        victim.kill()


def test_a_record_that_is_a_symbolic_link_is_not_followed(tmp_path):
    victim = _sleeper()
    try:
        time.sleep(0.2)
        _write(tmp_path / "elsewhere", _dead_pid(), [_entry(victim.pid)])
        planted = next((tmp_path / "elsewhere").glob("cluster-*.json"))
        (tmp_path / "d").mkdir(mode=0o700)
        (tmp_path / "d" / "cluster-1.json").symlink_to(planted)
        assert lc.reap_orphans(tmp_path / "d", grace_s=1) == []
        assert victim.poll() is None and planted.exists()
        assert list((tmp_path / "d").iterdir()) == []  # the link itself is dropped
    finally:
        victim.kill()


def test_a_reused_pid_with_the_same_command_line_is_left_alone(tmp_path):
    """Same pid and command line, another start time: another process (e.g. the same Ray binary
    of a later cluster) that took the recorded pid."""
    victim = _sleeper()
    try:
        time.sleep(0.2)
        entry = _entry(victim.pid)
        _write(tmp_path, _dead_pid(), [{**entry, "start": entry["start"] + 1}])
        assert lc.reap_orphans(tmp_path, grace_s=1) == []
        assert victim.poll() is None
    finally:
        victim.kill()


def test_invalid_pids_in_a_record_are_never_signalled(tmp_path, monkeypatch):
    """0 and negative pids signal process groups (-1: every process we may signal); a missing
    command line must not count as a match. The signals are recorded here, never sent."""
    sent, real_kill = [], os.kill

    def kill(pid, sig):
        if sig != 0:
            sent.append((pid, sig))
        elif type(pid) is not int or pid <= 0:
            raise ProcessLookupError
        else:
            real_kill(pid, sig)

    monkeypatch.setattr(lc.os, "kill", kill)
    bad = [{"pid": pid, "cmdline": cmdline, "start": 1} for pid in (0, -1, 1, os.getpid(), True, "123", 4194305)
           for cmdline in (None, "")]
    _write(tmp_path, _dead_pid(), bad)
    _write(tmp_path / "b", -1, [_entry(os.getpid())])
    assert lc.reap_orphans(tmp_path, grace_s=0.1) == [] and lc.reap_orphans(tmp_path / "b", grace_s=0.1) == []
    assert sent == []
    assert list(tmp_path.glob("cluster-*.json")) == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to own a file or run a process as another user")
def test_records_and_processes_of_another_user_are_left_alone(tmp_path):
    nobody = 65534
    theirs = subprocess.Popen(["sleep", "120"], user=nobody)
    mine = _sleeper()
    try:
        time.sleep(0.2)
        _write(tmp_path / "a", _dead_pid(), [_entry(theirs.pid)])  # a record of ours naming their process
        _write(tmp_path / "b", _dead_pid(), [_entry(mine.pid)])
        os.chown(next((tmp_path / "b").glob("cluster-*.json")), nobody, nobody)  # a record file of theirs
        assert lc.reap_orphans(tmp_path / "a", grace_s=1) == [] and lc.reap_orphans(tmp_path / "b", grace_s=1) == []
        assert theirs.poll() is None and mine.poll() is None
        assert lc._owner(theirs.pid) == nobody and lc._owner(mine.pid) == os.getuid()
    finally:
        theirs.kill()
        mine.kill()
