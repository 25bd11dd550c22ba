"""The learner's side of the weight sync: the policy tensors' specs, the broadcast group with the
engines (rank 0 is its group rank 0), and sending the buckets over it or putting them in the
object store. Where the engine shards parameters every rank takes part in the gathers; only
rank 0 sends.

What is sent: ``plain`` (parameter, HF name) as they are, and with LoRA ``merged``, HF name ->
an adapted layer's W, A, B, sent as the merged weight ``W + (alpha / r) B A``. With LoRA
``plain`` holds only the frozen tensors vLLM needs beside the merged ones to rebuild a fused
layer (``rlhf_ray.models.export``), so a sync moves the adapted layers only, not the whole model.

``WeightSender`` is a collaborator of :class:`rlhf_ray.workers.learner.Learner`: it exists from
the learner's construction (the sync group's address may be asked before set-up) and is bound
to the engine and the export plan once the model is built.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from rlhf_ray.backends.engine import TrainEngine, dist_backend, gather_full_state_dict
from rlhf_ray.models.export import ExportPlan
from rlhf_ray.models.lora import MergedParams, merged_weight
from rlhf_ray.weight_sync.plan import Bucket, TensorSpec, dtype_name
from rlhf_ray.weight_sync.transport import destroy_sync_group, new_sync_group, reserve_port, send_buckets, to_array


def gather_export(engine: TrainEngine, plan: ExportPlan, keep: bool, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full CPU copies of every tensor of ``plan`` (merged layers merged) under ``prefix`` + HF
    name where ``keep``, an empty dict elsewhere; one parameter (or one W, A, B) at a time.
    Every rank calls it (gathers are collective where the engine shards)."""
    params = dict(engine.module.named_parameters())
    out = gather_full_state_dict(engine, ((prefix + hf, params[name]) for name, hf in plan.plain), keep)
    for hf, merged in plan.merged.items():
        with engine.gathered(merged.params) as (w, a, b):
            if keep:
                out[prefix + hf] = merged_weight(w, a, b, merged.scaling).cpu()
    return plan.in_order(out, prefix)


class WeightSender:
    """Rank ``rank``'s part of every sync. ``node_ip`` gives this node's address (for the group's
    store); ``sync_timeout_s`` bounds one sync's sends (sync.timeout_s)."""

    def __init__(self, rank: int, sync_timeout_s: float, node_ip: Callable[[], str]) -> None:
        self.rank = rank
        self.sync_timeout_s = sync_timeout_s
        self.node_ip = node_ip
        self.engine: TrainEngine | None = None
        self.plain: list[tuple[torch.nn.Parameter, str]] = []  # (parameter, HF name) sent as they are
        self.merged: dict[str, MergedParams] = {}  # HF name -> an adapted layer's parameters (LoRA only)
        self.partial = False  # the export plan leaves layers out
        self.group = None  # the broadcast group with the engines (rank 0 only)
        self._listener = None  # the reserved port of the next group's store (rank 0 only)

    def bind(self, engine: TrainEngine, plan: ExportPlan) -> None:
        """What a sync sends, from ``plan`` over ``engine``'s parameters (set-up, once)."""
        params = dict(engine.module.named_parameters())
        self.engine = engine
        self.plain = [(params[inner], hf) for inner, hf in plan.plain]
        self.merged = dict(plan.merged)
        self.partial = not plan.complete  # engines keep the layers a sync leaves out

    def weight_specs(self) -> list[TensorSpec]:
        """The policy tensors a sync sends (never the value head), full shapes, under HF names."""
        shape, dtype = self.engine.full_shape, self.engine.value_dtype
        specs = [TensorSpec(hf, shape(p), dtype_name(dtype(p))) for p, hf in self.plain]
        return specs + [TensorSpec(hf, shape(m.base), dtype_name(dtype(m.base))) for hf, m in self.merged.items()]

    # ------------------------------------------------------------------ the group with the engines
    def sync_address(self, loopback: bool = False) -> tuple[str, int]:
        """Where the weight-sync group's store will listen (rank 0, before ``init_sync_group``):
        127.0.0.1 when ``loopback`` (every member of the group runs on this machine), else this
        node's address, never every interface. The port is reserved now (a listening socket,
        kept until ``init_sync_group`` serves the store on it)."""
        if self._listener is not None:  # an address handed out before whose group was never built
            self._listener.close()
        host = "127.0.0.1" if loopback else self.node_ip()
        self._listener = reserve_port(host)
        return host, self._listener.getsockname()[1]

    def init_sync_group(self, master_addr: str, master_port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0 joins the broadcast group with the rollout engines as its group rank 0.

        A group from before (a replaced engine or learner, a rebuild) is aborted and dropped
        first, so its communicators and TCPStore are gone before the new ones exist."""
        if self.rank != 0:
            return
        destroy_sync_group(self.group)
        self.group = None  # the last reference: the old group and its store are freed here
        listener, self._listener = self._listener, None
        if listener is not None and listener.getsockname()[:2] != (master_addr, master_port):
            listener.close()  # not the address sync_address gave: new_sync_group binds that one itself
            listener = None
        self.group = new_sync_group(master_addr, master_port, 0, world_size, dist_backend(), timeout_s,
                                    listener=listener)

    # ------------------------------------------------------------------ sending
    def _bucket_params(self, bucket: Bucket) -> list[torch.nn.Parameter]:
        """The parameters to gather for ``bucket``: each plain tensor, W, A and B of a merged one."""
        by_name = {hf: p for p, hf in self.plain}
        out: list[torch.nn.Parameter] = []
        for s in bucket.specs:
            out.extend(self.merged[s.name].params if s.name in self.merged else [by_name[s.name]])
        return out

    def full_buckets(self, buckets: list[Bucket]) -> Iterator[list[torch.Tensor]]:
        """Each bucket's full tensors, yielded on rank 0 while they are gathered; the other ranks
        yield nothing but must drain it too, since gathering may be collective. Rank 0 must drain
        it as well when it fails to send a bucket (see ``broadcast_weights``)."""
        for bucket in buckets:
            with self.engine.gathered(self._bucket_params(bucket)) as values:
                if self.rank != 0:
                    continue
                tensors, i = [], 0
                for s in bucket.specs:
                    merged = self.merged.get(s.name)
                    if merged is None:
                        tensors.append(values[i])
                        i += 1
                    else:
                        tensors.append(merged_weight(*values[i:i + 3], merged.scaling))
                        i += 3
                yield tensors

    def broadcast_weights(self, buckets: list[Bucket]) -> dict[str, float]:
        """Collective transport: rank 0 broadcasts each bucket (every rank takes part in gathers).

        Where the engine shards, the other ranks wait in the gather of rank 0's next bucket, a
        collective of the learner group. If the send fails (an engine died or stopped answering:
        at most sync.timeout_s, see ``send_buckets``), rank 0 still runs the remaining gathers
        before it raises, so the other ranks return at once instead of waiting in a gather until
        the group's own timeout (resources.call_timeout_s)."""
        t0 = time.perf_counter()
        full = self.full_buckets(buckets)
        sent = 0
        try:
            if self.rank == 0:
                sent = send_buckets(self.group, full, self.sync_timeout_s)
        finally:
            for _ in full:  # other ranks: every gather; rank 0: those left after a failed send
                pass
        return {"bytes": float(sent), "seconds": time.perf_counter() - t0}

    def export_arrays(self, buckets: list[Bucket]) -> list:
        """Object-store transport: rank 0 puts one flat array per bucket; returns the refs. As in
        ``broadcast_weights``, rank 0 finishes the gathers even if a put fails."""
        import ray

        full = self.full_buckets(buckets)
        refs = []
        try:
            for tensors in full:
                refs.append(ray.put(to_array(tensors)))
        finally:
            for _ in full:
                pass
        return refs
