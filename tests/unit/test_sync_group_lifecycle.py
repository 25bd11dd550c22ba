"""The weight-sync group's life on the learner (and engine) side, in one process, no Ray.

* Its TCPStore listens on the group's address only, on a port reserved when it is handed out.
* Rebuilding it aborts and frees the old group (and its store) before the new one forms.
* A send that fails still runs every remaining ZeRO gather on rank 0, so the other ranks are not
  left waiting in one; the send as a whole is bounded by its timeout.

Groups are real gloo groups: a "peer" (an engine's end) runs in a thread of this process. On Linux
all of 127.0.0.0/8 is this machine, so a store bound to 127.0.0.1 refuses 127.0.0.2 while one bound
to every interface accepts it.
"""

from __future__ import annotations

import dataclasses
import datetime
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rlhf_ray.backends.engine import nothing_to_gather
from rlhf_ray.backends.vllm import WeightReceiver
from rlhf_ray.config import config_from_dict
from rlhf_ray.weight_sync.plan import TensorSpec, plan_buckets
from rlhf_ray.weight_sync.transport import destroy_sync_group, free_port, new_sync_group, send_buckets
from rlhf_ray.workers.learner import Learner, LearnerSpec
from rlhf_ray.workers.learner_sync import WeightSender

REPO_ROOT = Path(__file__).resolve().parents[2]


def _spec(sync_timeout_s: float = 30.0) -> LearnerSpec:
    cfg = config_from_dict({"rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 1},
                            "ppo": {"mini_batches": 1},
                            "learner": {"num_ranks": 1, "micro_batch_size": 2, "zero_stage": 0}})
    # Keep this process's thread count: a role pins it to its spec's.
    return dataclasses.replace(LearnerSpec.from_config(cfg), threads=torch.get_num_threads(),
                               sync_timeout_s=sync_timeout_s)


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
        return True
    except OSError:
        return False


def _together(*calls):
    """Run the calls concurrently (the members of a group must join together); their results."""
    out: list = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i, call):
        try:
            out[i] = call()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


class FakeGroup:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def abort(self) -> None:
        self.events.append("abort")


# ---- item: the store listens on the group's address only, on a reserved port -----------------


def test_sync_store_listens_on_the_group_address_only():
    port = free_port()
    group = new_sync_group("127.0.0.1", port, 0, 1, "gloo", 10.0)
    try:
        assert _accepts("127.0.0.1", port)
        assert not _accepts("127.0.0.2", port)  # a store on every interface would accept this
    finally:
        destroy_sync_group(group)
        del group


def test_sync_address_reserves_its_port_until_the_group_is_built():
    learner = Learner(_spec(), rank=0)
    addr, port = learner.sync_address(loopback=True)
    assert addr == "127.0.0.1"
    with pytest.raises(OSError), socket.socket() as other:  # nobody can take the port in between
        other.bind(("127.0.0.1", port))
    learner.init_sync_group(addr, port, 1, 10.0)
    try:
        assert _accepts("127.0.0.1", port) and not _accepts("127.0.0.2", port)
    finally:
        destroy_sync_group(learner.sender.group)
        learner.sender.group = None


MASTER = """
import os, socket, sys
import torch, torch.distributed as dist
from tests.unit.test_sync_group_lifecycle import _accepts, _spec
from rlhf_ray.workers.learner import Learner

learner = Learner(_spec(), rank=0)
loopback = sys.argv[1] == "1"
host, port = learner.master_address(loopback=loopback)
assert host == "127.0.0.1" or not loopback, host
try:
    with socket.socket() as other:
        other.bind((host, port))
    sys.exit("the learner group's port could be taken before the group was set up")
except OSError:
    pass
# What DeepSpeed's init_distributed does on rank 0 (env:// rendezvous).
os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
t = torch.ones(2)
dist.all_reduce(t)
assert t.tolist() == [1.0, 1.0]
assert _accepts(host, port)
if host == "127.0.0.1":
    assert not _accepts("127.0.0.2", port), "the store listens on every interface"
dist.destroy_process_group()
print("OK", host, port)
"""


@pytest.fixture(scope="module")
def masters():
    """MASTER in a subprocess for each case, both started together (each spends seconds importing
    torch). A subprocess: the default process group is global to a process."""
    started = {loopback: subprocess.Popen([sys.executable, "-c", MASTER, "1" if loopback else "0"], cwd=REPO_ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for loopback in (True, False)}
    yield started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("loopback", [True, False])
def test_master_address_serves_the_learner_group_store_on_a_reserved_port(masters, loopback):
    # With every rank on one machine (loopback) the store listens on 127.0.0.1 only; else on the
    # node's address only.
    proc = masters[loopback]
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "OK" in out, out[-2000:] + err[-3000:]


# ---- item: rebuilding aborts and frees the old group first ----------------------------------


def test_learner_aborts_the_old_group_before_it_builds_the_new_one():
    events: list[str] = []
    learner = Learner(_spec(), rank=0)
    learner.sender.group = FakeGroup(events)
    addr, port = learner.sync_address(loopback=True)
    learner.init_sync_group(addr, port, 1, 10.0)
    try:
        assert events == ["abort"]
        assert isinstance(learner.sender.group, torch.distributed.ProcessGroupGloo)
    finally:
        destroy_sync_group(learner.sender.group)
        learner.sender.group = None


def test_learner_rebuild_closes_the_old_store_before_the_new_group_forms():
    """Rank 0 of a two-member group (an engine's end in a thread) rebuilds it: the old store is
    closed while the new group still waits for its engine, not only once the new group exists."""
    learner = Learner(_spec(), rank=0)
    addr, port = learner.sync_address()
    _, peer = _together(lambda: learner.init_sync_group(addr, port, 2, 20.0),
                        lambda: new_sync_group(addr, port, 1, 2, "gloo", 20.0))
    assert _accepts(addr, port)
    new_addr, new_port = learner.sync_address()
    rebuild = threading.Thread(target=learner.init_sync_group, args=(new_addr, new_port, 2, 20.0))
    rebuild.start()
    try:
        deadline = time.monotonic() + 5.0
        while _accepts(addr, port) and time.monotonic() < deadline:
            time.sleep(0.05)
        old_store_closed = not _accepts(addr, port)
    finally:
        destroy_sync_group(peer)
        peer = None  # the engine drops its old group too, then joins the new one
        new_peer = new_sync_group(new_addr, new_port, 1, 2, "gloo", 20.0)
        rebuild.join(30)
    try:
        assert old_store_closed, "the old group's store still listened while the new group was being built"
        sent, got = torch.arange(4.0), torch.zeros(4)
        _together(lambda: learner.sender.group.broadcast(sent, 0).wait(),
                  lambda: new_peer.broadcast(got, 0).wait())
        assert torch.equal(got, sent)  # the new group works
    finally:
        destroy_sync_group(new_peer)
        destroy_sync_group(learner.sender.group)
        new_peer = learner.sender.group = None


def test_engine_aborts_its_old_group_before_it_joins_the_new_one():
    events: list[str] = []
    receiver = WeightReceiver()
    receiver._rlhf_group = FakeGroup(events)
    port = free_port()
    master, _ = _together(lambda: new_sync_group("127.0.0.1", port, 0, 2, "gloo", 20.0),
                          lambda: receiver.rlhf_init_sync_group("127.0.0.1", port, 1, 2, "gloo", 20.0))
    try:
        assert events == ["abort"]
        assert isinstance(receiver._rlhf_group, torch.distributed.ProcessGroupGloo)
    finally:
        destroy_sync_group(receiver._rlhf_group)
        destroy_sync_group(master)
        receiver._rlhf_group = master = None


# ---- item: a failed send still drains the gathers; the send is bounded as a whole ------------


class GatherCountingSender(WeightSender):
    """Counts the buckets ``full_buckets`` gathers (each gather starts by looking up its params)."""

    gathers = 0

    def _bucket_params(self, bucket):
        self.gathers += 1
        return super()._bucket_params(bucket)


class _WholeEngine:
    """An engine whose parameters are whole on every rank: ``gathered`` yields them as they are."""

    gathered = staticmethod(nothing_to_gather)


def _counting_learner(spec: LearnerSpec) -> Learner:
    learner = Learner(spec, rank=0)
    learner.sender = GatherCountingSender(0, spec.sync_timeout_s, learner.node_ip)
    learner.sender.engine = _WholeEngine()
    return learner


def _with_params(learner: Learner, n: int) -> list:
    learner.sender.plain = [(torch.nn.Parameter(torch.full((16,), float(i))), f"layer.{i}") for i in range(n)]
    return plan_buckets([TensorSpec(name, (16,), "float32") for _, name in learner.sender.plain], bucket_bytes=64)


def test_rank0_runs_every_gather_when_the_send_times_out():
    """An engine joined the group but never receives: rank 0's send times out after
    sync_timeout_s, and rank 0 still runs the gathers of the buckets it did not send (under
    ZeRO-3 the other ranks wait in them), then raises."""
    learner = _counting_learner(_spec(sync_timeout_s=0.5))
    buckets = _with_params(learner, 5)
    assert len(buckets) == 5
    port = free_port()
    learner.sender.group, peer = _together(lambda: new_sync_group("127.0.0.1", port, 0, 2, "gloo", 10.0),
                                         lambda: new_sync_group("127.0.0.1", port, 1, 2, "gloo", 10.0))
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError):
            learner.broadcast_weights(buckets)
        assert time.monotonic() - t0 < 5.0
        assert learner.sender.gathers == 5  # every bucket, not just the ones before the failure
    finally:
        destroy_sync_group(peer)
        destroy_sync_group(learner.sender.group)
        peer = learner.sender.group = None


def test_rank0_runs_every_gather_when_an_export_fails():
    learner = _counting_learner(_spec())
    buckets = _with_params(learner, 4)
    # The first bucket cannot be copied to the host (a meta tensor has no data): the export fails
    # before any ray.put (so no Ray starts here), with three buckets still to gather.
    first, name = learner.sender.plain[0]
    learner.sender.plain[0] = (torch.nn.Parameter(torch.empty(first.shape, device="meta")), name)
    with pytest.raises(NotImplementedError):
        learner.export_arrays(buckets)
    assert learner.sender.gathers == 4


class SlowWork:
    """A broadcast that completes ``delay`` seconds after its wait starts, or times out first."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def wait(self, timeout: datetime.timedelta) -> bool:
        limit = timeout.total_seconds()
        time.sleep(min(self.delay, limit))
        if limit < self.delay:
            raise RuntimeError("Operation timed out!")
        return True


class SlowGroup:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.broadcasts = 0

    def broadcast(self, tensor, root):
        self.broadcasts += 1
        return SlowWork(self.delay)


def test_send_buckets_timeout_bounds_the_whole_send():
    # 6 buckets of 0.3 s each, 1 s in all: each wait alone is within 1 s, the send is not.
    group = SlowGroup(0.3)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out"):
        send_buckets(group, ([torch.zeros(2)] for _ in range(6)), timeout_s=1.0)
    assert time.monotonic() - t0 < 1.4
    fast = SlowGroup(0.01)
    assert send_buckets(fast, ([torch.zeros(2)] for _ in range(6)), timeout_s=1.0) == 6 * 8
