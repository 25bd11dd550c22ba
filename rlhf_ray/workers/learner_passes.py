"""The learner's forward passes: logprobs, values and entropy at the response positions, packed
or padded, and the no-grad passes whose count every rank agrees on.

``ForwardPasses`` is a collaborator of :class:`rlhf_ray.workers.learner.Learner`, built at
set-up around the engine and the value head. Every rank runs the same passes in the same order:
a sharding engine gathers parameters collectively in each forward.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from rlhf_ray.algorithms import chunked_logprobs_and_entropy
from rlhf_ray.backends.engine import TrainEngine
from rlhf_ray.backends.replicated import ReplicatedModule
from rlhf_ray.batch import ExperienceBatch, Generation, pack_generation, pack_rows, plan_passes
from rlhf_ray.config import LearnerConfig


class Forward(NamedTuple):
    """One pass's output at the response positions."""

    logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor | None  # (B, R); None without a critic
    entropy: torch.Tensor | None  # (B, R); None when not asked for


# Packed and padded logprobs agree to rounding; sequences that see each other differ by far more
# (0.5 nats on the tiny test model, nats on real ones).
PACKING_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


def _unpack(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1, N) at the packed response positions -> (B, R) of ``mask``'s shape, zeros at padding."""
    return torch.zeros(mask.shape, dtype=t.dtype, device=t.device).masked_scatter(mask, t)


class ForwardPasses:
    """Forward passes of ``engine`` (the body, or bodies) and ``head`` (the value head beside it,
    None without a critic) on this rank.

    Args:
        engine: the rank's training engine.
        head: the value head, or None.
        learner: the learner section (packing, pass budgets, logprob chunk).
        temperature: rollout.temperature: tokens are scored under the distribution they were sampled from.
        world_size: learner ranks (the no-grad pass count is agreed over them).
    """

    def __init__(self, engine: TrainEngine, head: ReplicatedModule | None, learner: LearnerConfig,
                 temperature: float, world_size: int) -> None:
        self.engine, self.head, self.learner = engine, head, learner
        self.temperature, self.world_size = temperature, world_size
        self.device = engine.device

    def forward(self, mb: ExperienceBatch, entropy: str, packing: bool | None = None) -> Forward:
        """Logprobs and values (B, R) at the response positions only (the LM head skips the
        prompt). With learner.packing (or ``packing``) the rows are laid end to end without
        padding first. ``entropy``: "grad" (it is in the loss), "log" (detached, for metrics)
        or "none"."""
        mask = mb.response_mask
        packing = self.learner.packing if packing is None else packing
        out, tokens = self._bodies(mb, packing)
        values = self.head.module(out.value_hidden) if self.head is not None else None
        logprobs, ent = chunked_logprobs_and_entropy(out.logits, tokens, self.temperature, entropy,
                                                     self.learner.logprob_chunk)
        if packing:  # (1, N) -> (B, R), zeros at padding
            logprobs = _unpack(logprobs, mask)
            values = _unpack(values, mask) if values is not None else None
            ent = _unpack(ent, mask) if ent is not None else None
        return Forward(logprobs, values, ent)

    def values(self, mb: ExperienceBatch, body_grad: bool) -> torch.Tensor:
        """Values (B, R) for a value-only pass (critic warm-up, critic epochs), no logprobs. The
        head's forward keeps its graph; the bodies' only with ``body_grad``: without it they run
        as a no-grad pass (no activations kept), so no gradient can reach a body, whatever
        model.value_grad_to_body says."""
        mask = mb.response_mask
        with torch.set_grad_enabled(body_grad):
            out, _ = self._bodies(mb, self.learner.packing)
        values = self.head.module(out.value_hidden)
        return _unpack(values, mask) if self.learner.packing else values

    def _bodies(self, mb: ExperienceBatch, packing: bool) -> tuple[Any, torch.Tensor]:
        """The engine's forward (an ``ActorCriticOutput``) at the response positions, and the tokens
        those positions predict: packed rows ((1, N) tokens in ``keep_index`` order) or padded ones
        ((B, R))."""
        mask = mb.response_mask
        if packing:
            rows = pack_rows(mb)
            out = self.engine(rows.input_ids, None, rows.position_ids, keep_index=rows.keep_index)
            return out, mb.response_ids[mask].unsqueeze(0)
        out = self.engine(mb.input_ids, mb.attention_mask.long(), mb.position_ids, response_len=mask.shape[1])
        return out, mb.response_ids

    def _parts(self, batch: ExperienceBatch, max_tokens: int, max_rows: int) -> list[torch.Tensor | None]:
        """Row indices of ``batch``'s no-grad forward passes (``plan_passes``): by token budget
        when ``max_tokens`` > 0, else consecutive chunks of ``max_rows`` sequences.

        Every rank runs as many passes as the rank that needs the most (one all-reduce): under
        ZeRO-3 each forward gathers parameters collectively, so a rank that stopped one pass
        early would leave the others waiting in a gather. The extra passes are ``None``: the
        caller runs them on one row and discards the result (as ``train``'s plan agrees its
        micro-batch count)."""
        lengths = batch.attention_mask.sum(-1).tolist() if max_tokens > 0 else None
        plan = plan_passes(len(batch), max_rows=max_rows, lengths=lengths, max_tokens=max_tokens)
        if self.world_size > 1:
            most = torch.tensor([len(plan)], device=self.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            plan = plan_passes(len(batch), max_rows=max_rows, lengths=lengths, max_tokens=max_tokens,
                               passes=int(most.item()))
        return [None if rows is None else torch.tensor(rows) for rows in plan]

    def no_grad(self, shard: ExperienceBatch, fill: Callable[[torch.Tensor, ExperienceBatch, Forward], None]) -> None:
        """Forward ``shard`` in the agreed passes (``_parts``) and hand each real pass's
        micro-batch and output to ``fill(rows, mb, forward)``; padding passes forward the shard's
        first row and drop the result (the coordinator never sends an empty slice)."""
        lrn = self.learner
        for rows in self._parts(shard, lrn.forward_max_tokens, lrn.forward_batch_size):
            if rows is None:
                if len(shard):
                    self.forward(shard.select(torch.tensor([0])).trim().to(self.device), entropy="none")
                continue
            mb = shard.select(rows).trim().to(self.device)
            fill(rows, mb, self.forward(mb, entropy="none"))

    @torch.no_grad()
    def check_packing(self, dtype: str) -> float:
        """learner.packing needs an attention that keeps packed sequences apart: transformers'
        sdpa/eager masks do, flash kernels do with the boundaries ``ActorCritic`` passes, other
        kernels may not. Checked once for the model's own attention: three made-up sequences
        (12, 5 and 6 tokens) go through the padded forward and the packed one, which lays them
        in two rows, one holding two sequences; the per-sequence mean logprob gap must stay
        within rounding for ``dtype`` (model.dtype). Every rank runs it (two forwards each). Returns
        the gap."""
        vocab = self.engine.module.policy.config.get_text_config().vocab_size
        g = torch.Generator().manual_seed(0)
        draw = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
        gen = Generation(prompt_ids=[draw(2) for _ in range(3)], response_ids=[draw(n) for n in (10, 3, 4)],
                         logprobs=[[0.0] * n for n in (10, 3, 4)], finish_reasons=["length"] * 3,
                         prompt_index=[0, 1, 2])
        mb = pack_generation(gen, pad_id=0).to(self.device)
        packed = self.forward(mb, entropy="none", packing=True).logprobs.float()
        padded = self.forward(mb, entropy="none", packing=False).logprobs.float()
        mask = mb.response_mask
        gap = float(((packed - padded).abs() * mask).sum(-1).div(mask.sum(-1)).max())
        limit = PACKING_TOLERANCE[dtype]
        if not gap <= limit:
            impl = self.engine.module.policy.config._attn_implementation
            raise RuntimeError(
                f"learner.packing: with attention {impl!r} the packed forward does not give the padded "
                f"forward's logprobs (mean gap {gap:.3g} nats per token on a made-up batch, allowed {limit}): "
                f"this attention lets packed sequences see each other. Set --learner.packing false, or load "
                f"the model with sdpa, eager or flash attention.")
        return gap
