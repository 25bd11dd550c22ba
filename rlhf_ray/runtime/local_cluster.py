"""The processes of a local Ray cluster this driver started, so that a later start can clean
them up if the driver was killed (SIGKILL leaves Ray's GCS, raylet, dashboard and workers
running, and a later run would attach to or collide with them).

Each driver that starts a local cluster records its pid and the cluster's processes (pid, start
time and command line) in ``<tmp>/rlhf_ray-<uid>/cluster-<driver pid>.json``, and removes the
record at a clean exit. A later start reaps the records of drivers that are gone: it ends only
processes that are still the ones recorded (same pid, start time and command line, and owned by
this user), so a reused pid is left alone. Standard library only.

The records decide which processes get signalled, and the directory's name is predictable (on a
shared login node another user could create it first), so it is trusted only when it is ours
alone: created with mode 0700; refused when it is a symbolic link, not a directory, owned by
someone else, or writable by group or others. A record file must be a regular file owned by us
(never followed through a symbolic link), and an entry with an invalid pid (0 and negative ones
would signal whole process groups) is ignored.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import tempfile
import time
from pathlib import Path

RECORD_NAME = re.compile(r"cluster-[^/]+\.json")
MAX_RECORD_BYTES = 1 << 20  # a real record is a few KiB


class UnsafeRecordsDir(ValueError):
    """The records directory cannot be trusted (see the module docstring)."""


def records_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"rlhf_ray-{os.getuid()}"


def _refuse(directory: Path, problem: str) -> UnsafeRecordsDir:
    return UnsafeRecordsDir(
        f"refusing to use {directory} for the records of local Ray clusters: it is {problem}. Its records decide "
        "which processes a launch ends, so it must be a directory of yours that nobody else can write. If you "
        f"made it, remove it (rm -r {directory}) and launch again; if you did not, someone else may have planted "
        "it: tell the machine's administrator, and meanwhile use a private temporary directory "
        "(mkdir -m 700 -p ~/.cache/tmp && export TMPDIR=~/.cache/tmp).")


def _open_private_dir(directory: Path, create: bool) -> int | None:
    """A file descriptor of ``directory`` once it is checked to be ours alone (created with mode
    0700 when missing and ``create``; None when missing otherwise). Raises UnsafeRecordsDir."""
    if create:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return None
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(directory, f"a symbolic link (to {os.readlink(directory)!r})")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(directory, "not a directory")
    if st.st_uid != uid:
        raise _refuse(directory, f"owned by uid {st.st_uid}, not by you (uid {uid})")
    if st.st_mode & 0o022:
        who = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if st.st_mode & bit)
        raise _refuse(directory, f"writable by {who} (mode {stat.S_IMODE(st.st_mode):o})")
    try:  # the checked path, never another one swapped in meanwhile
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise _refuse(directory, f"not openable as a plain directory ({exc.strerror})") from None
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise _refuse(directory, "replaced while it was being checked")
    return fd


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks after boot, field 22 of /proc/<pid>/stat): with the
    pid, it names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner(pid: int) -> int | None:
    """The real uid of process ``pid``."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Uid:"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _cmdline(pid) is not None or not os.path.isdir("/proc")


def _valid_pid(pid: object) -> bool:
    """A pid we may signal: a positive int (0 and -n signal process groups, -1 every process we
    may signal), not init, not this process."""
    return type(pid) is int and pid > 1 and pid != os.getpid()


def _is_recorded(proc: object) -> bool:
    """True when ``proc`` (a record's entry) is still that process, and ours."""
    if not (isinstance(proc, dict) and _valid_pid(proc.get("pid"))):
        return False
    pid, cmdline, start = proc["pid"], proc.get("cmdline"), proc.get("start")
    return (isinstance(cmdline, str) and cmdline != "" and type(start) is int and _owner(pid) == os.getuid()
            and _start_time(pid) == start and _cmdline(pid) == cmdline)


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
    """Remember this driver's local cluster: ``pids`` and their descendants, with their start
    times and command lines now. Raises UnsafeRecordsDir when the directory is not ours alone."""
    directory = directory or records_dir()
    dir_fd = _open_private_dir(directory, create=True)
    assert dir_fd is not None  # just created
    name = f"cluster-{os.getpid()}.json"
    procs = [{"pid": pid, "start": _start_time(pid), "cmdline": _cmdline(pid)} for pid in _with_descendants(pids)]
    data = json.dumps({"driver_pid": os.getpid(), "session_dir": session_dir,
                       "processes": [p for p in procs if p["cmdline"] is not None and p["start"] is not None]})
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
    finally:
        os.close(dir_fd)
    return directory / name


def _read_record(dir_fd: int, name: str) -> dict | None:
    """The record ``name`` when it is a regular file of ours (not followed through a link) with
    a valid driver pid and a list of processes; else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:  # ELOOP: a symbolic link; ENOENT: removed meanwhile
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > MAX_RECORD_BYTES:
            return None
        try:
            rec = json.loads(fh.read(MAX_RECORD_BYTES))
        except (OSError, ValueError):
            return None
    if not (isinstance(rec, dict) and _valid_pid(rec.get("driver_pid")) and isinstance(rec.get("processes"), list)):
        return None
    return rec


def _end(pids: list[int], grace_s: float) -> None:
    """SIGTERM, then SIGKILL for what is still there after ``grace_s``."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def reap_orphans(directory: Path | None = None, grace_s: float = 5.0) -> list[int]:
    """End the processes recorded by drivers that no longer run; returns the pids ended. Raises
    UnsafeRecordsDir (before signalling anything) when the directory is not ours alone."""
    directory = directory or records_dir()
    dir_fd = _open_private_dir(directory, create=False)
    if dir_fd is None:
        return []
    ended: list[int] = []
    try:
        for name in sorted(n for n in os.listdir(dir_fd) if RECORD_NAME.fullmatch(n)):
            rec = _read_record(dir_fd, name)
            if rec is not None and _alive(rec["driver_pid"]):
                continue  # its driver still runs: not an orphan
            mine = [p["pid"] for p in rec["processes"] if _is_recorded(p)] if rec is not None else []
            _end(mine, grace_s)
            ended += mine
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
    finally:
        os.close(dir_fd)
    return ended
