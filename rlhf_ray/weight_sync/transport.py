"""The two weight-sync transports' building blocks, used by both ends.

* collective: a dedicated process group between learner rank 0 (rank 0 of the group) and
  every rollout engine worker, created from a TCPStore so it never touches the default
  group of either side (DeepSpeed's on the learner, vLLM's on the engine). Rank 0 serves the
  store on the group's address only, at a port reserved when it is chosen. gloo on CPU,
  NCCL on GPU. Each bucket is one ``broadcast`` of a flat tensor; both ends keep two buckets
  in flight, so packing (learner) and loading (engine) overlap the transfer.
* object_store: each bucket is one flat numpy array put into Ray's object store: one copy
  into shared memory on the learner, read in place by an engine on the same node (Ray moves
  it between nodes), no serialisation format in between.
"""

from __future__ import annotations

import datetime
import socket
import time
import warnings
from collections import deque
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from rlhf_ray.weight_sync.plan import Bucket, dtype_from_name, flatten, unflatten


def free_port() -> int:
    """A port that was free a moment ago. Racy: another process may take it before the caller
    binds it. Where this package hosts a store itself it uses :func:`reserve_port` instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def reserve_port(host: str, port: int = 0) -> socket.socket:
    """A TCP socket listening on ``host`` only (not every interface), at ``port`` (0: one the
    kernel picks, read it with ``getsockname()[1]``). Handed to :func:`new_sync_group` or
    :func:`hosted_store` as the store's listening socket, the port stays ours from the moment it
    is chosen: no other process can take it in between (as it can after :func:`free_port`)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=128)


def hosted_store(listener: socket.socket, world_size: int | None, timeout_s: float, *,
                 wait_for_workers: bool, multi_tenant: bool = False) -> dist.TCPStore:
    """The server side of a TCPStore that listens on ``listener`` (from :func:`reserve_port`).

    TCPStore's own server binds every interface (torch 2.13: ``*:port``, whatever host it is
    given), and its protocol has no authentication; given a listening socket
    (``master_listen_fd``) it serves on that socket's address only. The store takes the socket
    over and closes it when it is destroyed, so the Python object is detached here.
    ``multi_tenant``: a later ``TCPStore(host, port, is_master=True, multi_tenant=True)`` in this
    process (what ``torch.distributed.init_process_group`` creates on rank 0) reuses this server
    instead of binding the port again."""
    host, port = listener.getsockname()[:2]
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=wait_for_workers,
                         multi_tenant=multi_tenant, master_listen_fd=listener.detach())


def serve_rendezvous(host: str, timeout_s: float) -> tuple[str, int, dist.TCPStore]:
    """Rank 0's side of a torch.distributed group's env:// rendezvous, started before the group:
    a store on ``host`` only, at a port the kernel picks, kept up by the caller (hold the returned
    store). ``init_process_group`` on rank 0 then creates its store with ``multi_tenant=True``,
    which reuses this server instead of binding the port again, so the port cannot be taken in
    between. Returns (host, port, store)."""
    listener = reserve_port(host)
    host, port = listener.getsockname()[:2]
    return host, port, hosted_store(listener, None, timeout_s, wait_for_workers=False, multi_tenant=True)


def new_sync_group(master_addr: str, master_port: int, rank: int, world_size: int,
                   backend: str, timeout_s: float, listener: socket.socket | None = None) -> dist.ProcessGroup:
    """A process group of ``world_size`` members, independent of the default group.

    All members must call this concurrently; rank 0 hosts the TCPStore, on ``master_addr`` only:
    on ``listener`` (from :func:`reserve_port`, which avoids a race for the port), or else on a
    socket it binds to ``master_addr:master_port`` now. Release the group with
    :func:`destroy_sync_group`."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown sync backend {backend!r}; use gloo (CPU) or nccl (GPU)")
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        store = hosted_store(listener or reserve_port(master_addr, master_port), world_size, timeout_s,
                             wait_for_workers=True)
    else:
        store = dist.TCPStore(master_addr, master_port, world_size, is_master=False, timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    opts = dist.ProcessGroupNCCL.Options()  # GPU only
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, opts)


def destroy_sync_group(group: dist.ProcessGroup | None) -> None:
    """Abort ``group``'s communication before the caller drops its last reference to it.

    NCCL: ``abort()`` (ncclCommAbort) frees the communicators at once without waiting for peers,
    which may be dead after a replacement; torch 2.13's ProcessGroupNCCL.hpp offers it "instead of
    relying on ProcessGroupNCCL destructor" (``shutdown()``, which ``destroy_process_group`` calls,
    is meant for a normal exit). gloo: ``abort()`` is the Backend no-op; the group's connections,
    threads and TCPStore (the server, on rank 0) close when the object is freed, i.e. when the
    caller drops it. Either way the caller must then drop its reference."""
    if group is not None:
        group.abort()


def send_buckets(group: dist.ProcessGroup, bucket_tensors: Iterable[list[torch.Tensor]], timeout_s: float,
                 in_flight: int = 2) -> int:
    """Sender side (group rank 0): broadcast each bucket as one flat tensor. Broadcasts are
    asynchronous, so the next bucket is flattened (and, under ZeRO-3, gathered) while earlier
    ones are on the wire; at most ``in_flight`` flat buffers are alive. Returns bytes sent.

    ``timeout_s`` bounds the whole send, not each wait: a receiver that stops answering makes
    this raise within ``timeout_s`` of the call (a ``RuntimeError`` from ``Work.wait``)."""
    deadline = time.monotonic() + timeout_s
    pending: deque[tuple[dist.Work, torch.Tensor]] = deque()

    def wait_oldest() -> None:
        # At least 1 ms: a zero timeout means "no timeout" to Work.wait.
        left = max(deadline - time.monotonic(), 1e-3)
        pending.popleft()[0].wait(datetime.timedelta(seconds=left))

    sent = 0
    for tensors in bucket_tensors:
        flat = flatten(tensors).contiguous()
        pending.append((group.broadcast(flat, 0), flat))
        sent += flat.numel() * flat.element_size()
        if len(pending) >= in_flight:
            wait_oldest()
    while pending:
        wait_oldest()
    return sent


def receive_buckets(group: dist.ProcessGroup, buckets: Sequence[Bucket], device: torch.device,
                    timeout_s: float, in_flight: int = 2) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side: the matching broadcasts, posted up to ``in_flight`` buckets ahead, yielded
    as (name, view) pairs bucket by bucket as each arrives, so the caller loads one bucket
    while the next is still on the wire. Must be consumed to the end (the sender waits)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    queue = iter(buckets)
    pending: deque[tuple[Bucket, torch.Tensor, dist.Work]] = deque()

    def post() -> None:
        bucket = next(queue, None)
        if bucket is not None:
            flat = torch.empty(bucket.numel, dtype=dtype_from_name(bucket.dtype), device=device)
            pending.append((bucket, flat, group.broadcast(flat, 0)))

    for _ in range(max(1, in_flight)):
        post()
    while pending:
        bucket, flat, work = pending.popleft()
        work.wait(timeout)
        post()
        yield from unflatten(flat, bucket)


def to_array(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """A bucket as one flat CPU numpy array (object-store transport).

    ``tensors``: one dtype, any shapes, all on one device (CPU or CUDA). Returns a 1-D array of
    ``sum(t.numel())`` elements in plan order. numpy has no bfloat16, so 16-bit floats travel as
    their int16 bit patterns; :func:`from_array` restores the dtype.

    On the CPU the bucket is concatenated once, as before (no further copy). From a CUDA device
    it is concatenated there and then copied to the host through pinned memory
    (:func:`_pinned_host_copy`): a pageable ``.to("cpu")`` ran at 1.8 GB/s on an H200, a
    pinned one at 52-55 GB/s. The array always owns fresh memory that nothing else writes, so
    the caller may hold several of them before ``ray.put`` copies them.
    """
    flat = flatten(tensors)
    flat = _pinned_host_copy(flat) if flat.device.type == "cuda" else flat.to("cpu")
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)
    return flat.numpy()


def _pinned_host_copy(flat: torch.Tensor) -> torch.Tensor:
    """Copy a 1-D CUDA tensor into a new pinned (page-locked) CPU tensor of the same dtype.

    The copy is issued on the current stream of ``flat``'s device (the stream PyTorch uses for a
    device-to-host copy) and that stream is synchronised before returning, so the host tensor is
    complete and ``flat`` may be freed.

    A fresh buffer per bucket, not one buffer reused across the buckets of a sync: the numpy
    array handed out is a view of this buffer, and a reused buffer would be overwritten by the
    next bucket if a caller held the array (or a ``ray.put`` of it were deferred). PyTorch's
    caching host allocator makes the fresh buffer cheap: a pinned block goes back to its cache
    when the last array viewing it is dropped (after ``ray.put`` has copied it into shared
    memory) and is handed out again for the next bucket of the same power-of-two size class, so
    pinning is paid about once per bucket size, not once per bucket. The cache keeps those blocks
    (about one bucket each, rounded up) for the life of the process.
    """
    host = torch.empty(flat.shape, dtype=flat.dtype, device="cpu", pin_memory=True)
    host.copy_(flat, non_blocking=True)
    torch.cuda.current_stream(flat.device).synchronize()
    return host


def from_array(array: np.ndarray, bucket: Bucket, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """A bucket's named tensors on ``device`` from :func:`to_array`'s array. On the CPU they are
    views of the array, which Ray maps read-only from shared memory (no copy): readers only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(array)
    dtype = dtype_from_name(bucket.dtype)
    if flat.dtype != dtype:
        flat = flat.view(dtype)
    return unflatten(flat.to(device), bucket)
