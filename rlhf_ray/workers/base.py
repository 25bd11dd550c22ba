"""Set-up shared by every role: thread counts, identity, and small introspection calls."""

from __future__ import annotations

import os
import socket

import torch


def set_threads(threads: int) -> None:
    """Pin torch/OpenMP thread counts. On a shared CPU, oversubscription makes every role slower
    (measured 5-8x on 2 cores), so each process takes exactly what its config grants."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


class RoleBase:
    """Base of every role class. ``role`` names it in actor names, logs and errors."""

    role = "role"

    def __init__(self, index: int, threads: int) -> None:
        self.index = index
        set_threads(threads)

    @property
    def label(self) -> str:
        return f"{self.role}-{self.index}"

    def node_ip(self) -> str:
        try:
            import ray

            return ray.util.get_node_ip_address()
        except Exception:  # not inside Ray
            return socket.gethostbyname(socket.gethostname())

    def ping(self) -> dict:
        """Liveness and placement facts (pid, node) for the dashboard and tests."""
        node_id = None
        try:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return {"role": self.role, "index": self.index, "pid": os.getpid(), "node_ip": self.node_ip(),
                "node_id": node_id}
