"""The learner's side of the weight sync, mixed into ``Learner``: the policy tensors' specs, the
broadcast group with the engines (rank 0 is its group rank 0), and sending the buckets over it
or putting them in the object store. Under ZeRO-3 every rank takes part in the gathers; only
rank 0 sends. Uses the learner's ``spec``, ``rank``, ``sync_params``, ``sync_merged`` and ``node_ip``.

What is sent: ``sync_params`` (parameter, HF name) as they are, and with LoRA ``sync_merged``, HF
name -> an adapted layer's W, A, B, sent as the merged weight ``W + (alpha / r) B A``. With LoRA
``sync_params`` holds only the frozen tensors vLLM needs beside the merged ones to rebuild a fused
layer (``rlhf_ray.models.export``), so a sync moves the adapted layers only, not the whole model.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from rlhf_ray.backends import deepspeed as ds
from rlhf_ray.models.actor_critic import POLICY_PREFIX
from rlhf_ray.models.export import ExportPlan, export_plan
from rlhf_ray.models.lora import MergedParams
from rlhf_ray.weight_sync.plan import Bucket, TensorSpec, dtype_name
from rlhf_ray.weight_sync.transport import destroy_sync_group, new_sync_group, reserve_port, send_buckets, to_array


class WeightSender:
    sync_merged: dict[str, MergedParams] = {}  # HF name -> an adapted layer's parameters (LoRA only)
    sync_partial: bool = False  # the export plan leaves layers out (set with sync_params at set-up)

    def weight_specs(self) -> list[TensorSpec]:
        """The policy tensors a sync sends (never the value head) under the engine's names."""
        specs = [TensorSpec(hf, ds.param_shape(p), dtype_name(p.dtype)) for p, hf in self.sync_params]
        return specs + [TensorSpec(hf, ds.param_shape(m.base), dtype_name(m.base.dtype))
                        for hf, m in self.sync_merged.items()]

    def sync_is_partial(self) -> bool:
        """Whether a sync leaves layers out (LoRA: only the adapted layers travel), so the engines'
        "weights were not loaded" warnings for the others are expected; from the export plan."""
        return bool(self.sync_partial)

    def sync_address(self, loopback: bool = False) -> tuple[str, int]:
        """Where the weight-sync group's store will listen; call on rank 0 before
        ``init_sync_group``. 127.0.0.1 when ``loopback`` (every member of the group runs on this
        machine), else this node's address: never every interface. The port is reserved now (a
        listening socket, kept until ``init_sync_group`` serves the store on it)."""
        stale = getattr(self, "_sync_listener", None)
        if stale is not None:  # an address handed out before whose group was never built
            stale.close()
        host = "127.0.0.1" if loopback else self.node_ip()
        self._sync_listener = reserve_port(host)
        return host, self._sync_listener.getsockname()[1]

    def init_sync_group(self, master_addr: str, master_port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0 joins the broadcast group with the rollout engines as its group rank 0.

        A group from before (a replaced engine or learner, a rebuild) is aborted and dropped
        first, so its communicators and TCPStore are gone before the new ones exist."""
        if self.rank != 0:
            return
        destroy_sync_group(self.sync_group)
        self.sync_group = None  # the last reference: the old group and its store are freed here
        listener, self._sync_listener = getattr(self, "_sync_listener", None), None
        if listener is not None and listener.getsockname()[:2] != (master_addr, master_port):
            listener.close()  # not the address sync_address gave: new_sync_group binds that one itself
            listener = None
        self.sync_group = new_sync_group(master_addr, master_port, 0, world_size, ds.dist_backend(), timeout_s,
                                         listener=listener)

    def _bucket_params(self, bucket: Bucket) -> list[torch.nn.Parameter]:
        """The parameters to gather for ``bucket``: each plain tensor, W, A and B of a merged one."""
        by_name = {hf: p for p, hf in self.sync_params}
        out: list[torch.nn.Parameter] = []
        for s in bucket.specs:
            out.extend(self.sync_merged[s.name].params if s.name in self.sync_merged else [by_name[s.name]])
        return out

    def _sync_tensor(self, name: str, by_name: dict[str, torch.nn.Parameter]) -> torch.Tensor:
        merged = self.sync_merged.get(name)
        return merged.value() if merged is not None else by_name[name].data

    def _full_buckets(self, buckets: list[Bucket]) -> Iterator[list[torch.Tensor]]:
        """Each bucket's full tensors, yielded on rank 0 while they are gathered (ZeRO-3); the
        other ranks yield nothing but must drain it too, since gathering is collective. Rank 0
        must drain it as well when it fails to send a bucket (see ``broadcast_weights``)."""
        by_name = {hf: p for p, hf in self.sync_params}
        for bucket in buckets:
            params = self._bucket_params(bucket)
            with ds.gathered(params, self.spec.learner.zero_stage):
                if self.rank == 0:
                    yield [self._sync_tensor(s.name, by_name) for s in bucket.specs]

    def broadcast_weights(self, buckets: list[Bucket]) -> dict[str, float]:
        """Collective transport: rank 0 broadcasts each bucket (every rank takes part in gathers).

        Under ZeRO-3 the other ranks wait in the gather of rank 0's next bucket, a collective of
        the learner group. If the send fails (an engine died or stopped answering: at most
        sync.timeout_s, see ``send_buckets``), rank 0 still runs the remaining gathers before it
        raises, so the other ranks return at once instead of waiting in a gather until the
        group's own timeout (resources.call_timeout_s)."""
        t0 = time.perf_counter()
        full = self._full_buckets(buckets)
        sent = 0
        try:
            if self.rank == 0:
                sent = send_buckets(self.sync_group, full, self.spec.sync_timeout_s)
        finally:
            for _ in full:  # other ranks: every gather; rank 0: those left after a failed send
                pass
        return {"bytes": float(sent), "seconds": time.perf_counter() - t0}

    def export_arrays(self, buckets: list[Bucket]) -> list:
        """Object-store transport: rank 0 puts one flat array per bucket; returns the refs. As in
        ``broadcast_weights``, rank 0 finishes the gathers even if a put fails."""
        import ray

        full = self._full_buckets(buckets)
        refs = []
        try:
            for tensors in full:
                refs.append(ray.put(to_array(tensors)))
        finally:
            for _ in full:
                pass
        return refs

    # ------------------------------------------------------------------ full exports (all ranks call)
    def gather_export(self, plan: ExportPlan, keep: bool, prefix: str = "") -> dict[str, torch.Tensor]:
        """Full CPU copies of every tensor of ``plan`` (merged layers merged) under ``prefix`` + HF
        name where ``keep``, an empty dict elsewhere; one parameter (or one W, A, B) at a time."""
        stage = self.spec.learner.zero_stage
        params = dict(self.engine.module.named_parameters())
        out = ds.gather_full_state_dict(((prefix + hf, params[name]) for name, hf in plan.plain), stage, keep)
        for hf, merged in plan.merged.items():
            with ds.gathered(merged.params, stage):
                if keep:
                    out[prefix + hf] = merged.value().cpu()
        return plan.in_order(out, prefix)

    def policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full policy weights under HF names on rank 0 (adapted layers merged; None elsewhere);
        all ranks must call."""
        out = self.gather_export(export_plan(self.engine.module.policy, POLICY_PREFIX), keep=self.rank == 0)
        return out if self.rank == 0 else None
