"""One learner rank with the whole batch and two ranks with half each make the same update.

Runs real learner actors (DeepSpeed ZeRO-2, and FSDP2; gloo) on a synthetic experience batch. SGD is used
so that the update is proportional to the gradient: Adam's first step is ~lr * sign(grad) and
would hide a wrongly scaled gradient.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.batch import ExperienceBatch
from tests.integration.conftest import small_config

pytestmark = pytest.mark.integration


def synthetic_batch(B: int = 8, P: int = 5, R: int = 6, vocab: int = 400, seed: int = 0) -> ExperienceBatch:
    g = torch.Generator().manual_seed(seed)
    resp_len = torch.randint(2, R + 1, (B,), generator=g)
    prompt_len = torch.randint(2, P + 1, (B,), generator=g)
    input_ids = torch.zeros(B, P + R, dtype=torch.long)
    attention = torch.zeros(B, P + R, dtype=torch.bool)
    for i in range(B):
        attention[i, P - prompt_len[i]: P + resp_len[i]] = True
    input_ids[attention] = torch.randint(4, vocab, (int(attention.sum()),), generator=g)
    response_mask = attention[:, P:].clone()
    randn = lambda: torch.randn(B, R, generator=g) * response_mask  # noqa: E731
    return ExperienceBatch(
        input_ids=input_ids, attention_mask=attention,
        position_ids=(attention.long().cumsum(-1) - 1).clamp(min=0), response_mask=response_mask,
        rollout_logprobs=torch.zeros(B, R), truncated=torch.zeros(B, dtype=torch.bool),
        prompt_index=torch.arange(B), old_logprobs=-3.0 + randn() * 0.1, old_values=randn() * 0.1,
        advantages=randn(), returns=randn())


def _groups(ray, cfgs: dict[int, object], timeout_s: float):
    """A set-up learner group for each ``{ranks: config}``. Every actor is created before any group
    is set up, so the groups' processes start together (a set-up is mostly process start and
    imports) instead of one group after the other; each group has its own rendezvous."""
    from rlhf_ray.runtime.groups import LearnerGroup
    from rlhf_ray.workers.actors import LearnerActor
    from rlhf_ray.workers.learner import LearnerSpec

    actors = {ranks: [LearnerActor.options(num_cpus=0.5).remote(LearnerSpec.from_config(cfg), r) for r in range(ranks)]
              for ranks, cfg in cfgs.items()}
    groups = {ranks: LearnerGroup(group, timeout_s=timeout_s) for ranks, group in actors.items()}
    try:
        for pending in [group.setup() for group in groups.values()]:
            pending.result()
    except BaseException:
        _kill(ray, groups)
        raise
    return groups


def _kill(ray, groups: dict) -> None:
    for group in groups.values():
        for a in group.actors:
            ray.kill(a)


def _updates(ray, model: str, batch: ExperienceBatch, **overrides) -> dict[int, tuple[dict, dict]]:
    """One update of ``batch`` on one rank and on two ranks: ``{ranks: (metrics, policy weights)}``."""
    from rlhf_ray.batch import TrainUpdate

    cfgs = {ranks: small_config(model, **{
        "learner.num_ranks": ranks, "learner.optimizer": "sgd", "learner.lr": 0.5, "learner.max_grad_norm": 0,
        "learner.micro_batch_size": 2, "ppo.mini_batches": 1, "ppo.epochs": 1, "rollout.prompts_per_iteration": 2,
        "rollout.samples_per_prompt": 4, "ppo.entropy_coef": 0.01, **overrides}) for ranks in (1, 2)}
    groups = _groups(ray, cfgs, timeout_s=300)
    try:
        # old logprobs from the learner itself (each rank keeps its slice), so the first ratio is exactly 1
        olds = {ranks: group.compute_old(batch) for ranks, group in groups.items()}
        for pending in olds.values():
            pending.result()
        trains = {ranks: group.train(TrainUpdate.of(batch), iteration=0) for ranks, group in groups.items()}
        metrics = {ranks: pending.result() for ranks, pending in trains.items()}
        states = {ranks: group.policy_state_dict() for ranks, group in groups.items()}
        return {ranks: (metrics[ranks], pending.result()) for ranks, pending in states.items()}
    finally:
        _kill(ray, groups)


# FSDP2 at reshard 3 and the other loss aggregations: tests/unit/test_train_engines.py (the engine's
# 1-vs-2-rank sum) with the learner's step counts checked here on DeepSpeed.
@pytest.mark.parametrize("overrides", [
    {}, {"ppo.loss_agg": "seq_mean_token_sum_norm", "ppo.estimator": "grpo"}, {"learner.backend": "fsdp2"}],
    ids=["token_mean-gae", "dr_grpo", "fsdp2-gae"])
def test_one_rank_and_two_ranks_make_the_same_update(ray_cluster, tiny_llama, overrides):
    batch = synthetic_batch()
    updates = _updates(ray_cluster, tiny_llama, batch, **overrides)
    (m1, w1), (m2, w2) = updates[1], updates[2]
    assert m1["grad_norm"] > 0
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
    if "value_head_grad_norm" in m1:  # the head beside the engine gets the full-batch gradient too
        assert m1["value_head_grad_norm"] > 0
        assert m2["value_head_grad_norm"] == pytest.approx(m1["value_head_grad_norm"], rel=1e-4)
    # the ranks hold different token counts: the group's metrics are the whole batch's
    assert m2["learner_tokens"] == m1["learner_tokens"] == int(batch.attention_mask.sum())
    for key in ("policy_loss", "entropy", "clip_fraction"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    assert set(w1) == set(w2)
    moved = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert moved < 1e-5, moved
    # the update did change the weights (so equality above is not trivially true)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    assert max(float((w1[k] - base[k]).abs().max()) for k in w1) > 1e-4


def _batch_of_lengths(lengths: list[int], P: int = 4, vocab: int = 400) -> ExperienceBatch:
    """A batch whose row i has a 2-token prompt and ``lengths[i] - 2`` response tokens."""
    B, R = len(lengths), max(lengths) - 2
    g = torch.Generator().manual_seed(1)
    attention = torch.zeros(B, P + R, dtype=torch.bool)
    for i, n in enumerate(lengths):
        attention[i, P - 2: P + n - 2] = True
    input_ids = torch.zeros(B, P + R, dtype=torch.long)
    input_ids[attention] = torch.randint(4, vocab, (int(attention.sum()),), generator=g)
    response_mask = attention[:, P:].clone()
    return ExperienceBatch(
        input_ids=input_ids, attention_mask=attention,
        position_ids=(attention.long().cumsum(-1) - 1).clamp(min=0), response_mask=response_mask,
        rollout_logprobs=torch.zeros(B, R), truncated=torch.zeros(B, dtype=torch.bool),
        prompt_index=torch.arange(B))


def test_zero3_no_grad_passes_agree_their_count_over_ranks(ray_cluster, tiny_llama):
    """ZeRO-3 gathers parameters in every forward, so the ranks' no-grad passes (old logprobs and
    the LoRA reference pass) must be as many on every rank. With a token budget of 12, rank 0's
    slice (four 3-token rows) fits one pass and rank 1's (four 11-token rows) needs four: without
    agreement rank 1 waits in a gather that rank 0 never enters (issue: configs/gpu_8x.yaml hung).
    The results must equal one rank's over the whole batch without a budget."""
    batch = _batch_of_lengths([3, 3, 3, 3, 11, 11, 11, 11])
    budgets = {2: 12, 1: 0}
    cfgs = {ranks: small_config(tiny_llama, **{
        "learner.num_ranks": ranks, "learner.zero_stage": 3, "learner.forward_max_tokens": budget,
        "model.lora.rank": 4, "rollout.prompts_per_iteration": 2, "rollout.samples_per_prompt": 4,
        "ppo.mini_batches": 1, "rollout.max_new_tokens": 9, "resources.call_timeout_s": 90,
        "model.value_head_init_std": 0.02}) for ranks, budget in budgets.items()}
    groups = _groups(ray_cluster, cfgs, timeout_s=120)
    try:
        olds = {ranks: group.compute_old(batch) for ranks, group in groups.items()}
        refs = {ranks: [a.reference_logprobs.remote(batch, 1.0) for a in group.actors]
                for ranks, group in groups.items()}
        (lp1, v1), (lp2, v2) = olds[1].result(), olds[2].result()
        ref1, ref2 = (torch.cat(ray_cluster.get(refs[ranks], timeout=120)) for ranks in (1, 2))
    finally:
        _kill(ray_cluster, groups)
    mask = batch.response_mask
    assert bool((lp1[mask] < 0).all()) and bool((v1[mask] != 0).any())
    torch.testing.assert_close(lp2, lp1, atol=1e-5, rtol=0)
    torch.testing.assert_close(v2, v1, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref2, ref1, atol=1e-5, rtol=0)
    # LoRA adapters start as the identity: the reference (adapters off) is the policy here
    torch.testing.assert_close(ref1, lp1, atol=1e-5, rtol=0)
