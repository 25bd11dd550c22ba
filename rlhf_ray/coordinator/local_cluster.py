"""The processes of a local Ray cluster this driver started, so that a later start can clean
them up if the driver was killed (SIGKILL leaves Ray's GCS, raylet, dashboard and workers
running, and a later run would attach to or collide with them).

Each driver that starts a local cluster records its pid and the cluster's processes (pid and
command line) in ``<tmp>/rlhf_ray-<uid>/cluster-<driver pid>.json``, and removes the record at a
clean exit. A later start reaps the records of drivers that are gone: it ends only processes
whose pid AND command line still match the record (a reused pid is left alone). Standard library
only.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path


def records_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"rlhf_ray-{os.getuid()}"


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _cmdline(pid) is not None or not os.path.isdir("/proc")


def _with_descendants(pids: list[int]) -> list[int]:
    """``pids`` and, recursively, their children (the raylet starts the dashboard and runtime-env
    agents itself; they outlive a killed driver, the raylet does not)."""
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop(0)
        if pid in out:
            continue
        out.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def record(pids: list[int], session_dir: str | None, directory: Path | None = None) -> Path:
    """Remember this driver's local cluster: ``pids`` and their descendants, with their command
    lines now."""
    directory = directory or records_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"cluster-{os.getpid()}.json"
    procs = [{"pid": pid, "cmdline": _cmdline(pid)} for pid in _with_descendants(pids)]
    path.write_text(json.dumps({"driver_pid": os.getpid(), "session_dir": session_dir,
                                "processes": [p for p in procs if p["cmdline"] is not None]}))
    return path


def reap_orphans(directory: Path | None = None, grace_s: float = 5.0) -> list[int]:
    """End the processes recorded by drivers that no longer run; returns the pids ended."""
    directory = directory or records_dir()
    ended: list[int] = []
    for path in sorted(directory.glob("cluster-*.json")) if directory.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            path.unlink(missing_ok=True)
            continue
        if _alive(int(rec["driver_pid"])):
            continue  # its driver still runs: not an orphan
        mine = [p["pid"] for p in rec["processes"] if _cmdline(p["pid"]) == p["cmdline"]]
        for pid in mine:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while any(_alive(pid) for pid in mine) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in mine:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        ended += mine
        path.unlink(missing_ok=True)
    return ended
