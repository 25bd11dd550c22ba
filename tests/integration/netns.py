"""A two-node Ray cluster on one machine for tests, over ``scripts/two_node.sh``: two network
namespaces joined by a veth pair, a Ray head in one (10.77.0.1) and a worker in the other
(10.77.0.2), token authentication on. The script builds and removes it; this module drives it
from a test: run a command on a node, submit and watch a job, list what listens, kill a node.

Every method that runs something goes through ``ip netns exec`` (the script's ``exec``), so the
job client runs inside the head's namespace and reaches the dashboard on its 127.0.0.1:8265,
as ``ssh -L`` would on real machines.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "two_node.sh"


def unavailable() -> str | None:
    """Why a two-node cluster cannot be built here (None when it can): not root, no ``ip``, or
    the kernel refuses a network namespace (e.g. a container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the test as root)"
    if shutil.which("ip") is None or shutil.which("ss") is None:
        return "needs iproute2 (the ip and ss commands)"
    probe = f"rrprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass(frozen=True)
class Listener:
    address: str  # as bound: an address, or "*" for every address of the namespace
    port: int
    pid: int
    process: str  # the process title (Ray names its workers "ray::<role>:<method>", ...)

    @property
    def wildcard(self) -> bool:
        return self.address == "*"


class TwoNodes:
    """One cluster, named by ``ident`` (namespaces ``rr<ident>a`` and ``rr<ident>b``), with its
    token, Ray logs and cluster.env in ``work``. ``up()`` builds it; ``down()`` (always call it)
    ends every process in both namespaces and removes them, also after a failed ``up()``."""

    dashboard = "http://127.0.0.1:8265"

    def __init__(self, ident: str, work: Path) -> None:
        self.ident, self.work = ident, Path(work)
        self.ns = {"a": f"rr{ident}a", "b": f"rr{ident}b"}
        self.addr = {"a": "10.77.0.1", "b": "10.77.0.2"}
        self.iface = "rrlink"

    def _script(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"two_node.sh {' '.join(args[:4])} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def up(self) -> None:
        try:
            self._script("up", self.ident, str(self.work))
        except RuntimeError as exc:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.work.glob("ray_*.log")))
            raise RuntimeError(f"{exc}{logs}") from None

    def down(self) -> None:
        self._script("down", self.ident, str(self.work), check=False)

    def run(self, node: str, *argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """``argv`` on ``node`` ("a" or "b") with the cluster's environment (token, PYTHONPATH)."""
        return self._script("exec", self.ident, str(self.work), node, *argv, timeout=timeout, check=check)

    # ------------------------------------------------------------------ jobs (client on the head's loopback)
    def ray(self) -> str:
        return str(Path(os.environ.get("PYTHON", ROOT / ".venv" / "bin" / "python")).parent / "ray")

    def submit(self, job_id: str, entrypoint: list[str]) -> None:
        self.run("a", self.ray(), "job", "submit", "--address", self.dashboard, "--submission-id", job_id,
                 "--no-wait", "--", *entrypoint)

    def job_status(self, job_id: str) -> str:
        out = self.run("a", self.ray(), "job", "status", "--address", self.dashboard, job_id, check=False).stdout
        # Ray 2.60's wording (dashboard/modules/job/cli.py, _log_job_status)
        ended = {f"Job '{job_id}' succeeded": "SUCCEEDED", f"Job '{job_id}' failed": "FAILED",
                 f"Job '{job_id}' was stopped": "STOPPED"}
        for text, state in ended.items():
            if text in out:
                return state
        running = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", out)
        return running.group(1) if running else "UNKNOWN"

    def wait_job(self, job_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_status(job_id)
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                return state
            time.sleep(3)
        return "TIMEOUT"

    def job_logs(self, job_id: str) -> str:
        return self.run("a", self.ray(), "job", "logs", "--address", self.dashboard, job_id, check=False).stdout

    # ------------------------------------------------------------------ the network as each node sees it
    def addresses(self, node: str) -> set[str]:
        """Every address configured in ``node``'s namespace (IPv4 and IPv6)."""
        out = subprocess.run(["ip", "-n", self.ns[node], "-o", "addr", "show"], capture_output=True, text=True,
                             check=True).stdout
        return {line.split()[3].split("/")[0] for line in out.splitlines()}

    def listeners(self, node: str) -> list[Listener]:
        """Every listening TCP socket in ``node``'s namespace, with its process."""
        out = subprocess.run(["ip", "netns", "exec", self.ns[node], "ss", "-ltnpH"], capture_output=True, text=True,
                             check=True).stdout
        found = []
        for line in out.splitlines():
            fields = line.split()
            host, _, port = fields[3].rpartition(":")
            host = host.strip("[]").split("%")[0]
            if host in ("0.0.0.0", "::", "*"):
                host = "*"
            pids = re.findall(r"pid=(\d+)", " ".join(fields[5:]))
            pid = int(pids[0]) if pids else -1
            found.append(Listener(host, int(port), pid, _title(pid)))
        return found

    def pids(self, node: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns[node]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def gone(self) -> bool:
        """Whether both namespaces and every link this cluster made on the host are removed."""
        spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        return not any(ns in spaces or f" {ns}@" in links or f" {ns}:" in links for ns in self.ns.values())

    def kill_node(self, node: str) -> int:
        """SIGKILL every process of ``node`` at once (raylet, object store, workers, actors): the
        machine losing power, as far as the rest of the cluster can tell. Returns how many."""
        pids = self.pids(node)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def outside(listener: Listener, own: set[str]) -> bool:
    """Whether ``listener`` is bound to an address that is not one of its namespace's own."""
    if listener.wildcard:
        return False  # every address of the namespace: ``own``, checked separately
    address = ipaddress.ip_address(listener.address)
    mapped = getattr(address, "ipv4_mapped", None)  # [::ffff:10.77.0.1] on a dual-stack socket
    return str(mapped or address) not in own
