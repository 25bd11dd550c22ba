"""Replicated frozen roles (reference.replicas, reward.replicas) with in-process fakes, no Ray
started: how a batch is split over the replicas and joined back in order, the object each part
travels as, where the replicas are placed, how a failed replica is named and replaced, and the
config checks that come before Ray.

The fake replicas compute a value of each row that tells rows apart (its prompt index, which is
the row number here), so a row joined back in the wrong place shows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf_ray.batch import ExperienceBatch, Generation, join_rows, pack_generation, token_balanced_parts
from rlhf_ray.config import ConfigError, config_from_dict, validate
from rlhf_ray.coordinator.recovery import Recovery
from rlhf_ray.runtime.pending import RemoteCallError, describe
from rlhf_ray.runtime.placement import RolePlacement, check_fits, placement_plan
from tests.unit.test_coordinator import EOS, PAD, FakeLearners, FakeRollout, FakeSync, _config, _prompts

# ---- joining parts back in order (pure) -------------------------------------------------------


def test_join_rows_hand_example():
    out = join_rows([[1], [0, 2]], [torch.tensor([10.0]), torch.tensor([20.0, 30.0])])
    assert out.tolist() == [20.0, 10.0, 30.0]


@pytest.mark.parametrize("lengths,replicas", [([5, 1, 4, 2, 9], 2), ([5, 1, 4, 2, 9], 3), ([7, 7], 4),
                                              ([3, 8, 1, 1, 1, 6, 2], 4)])
def test_token_balanced_parts_then_join_rows_give_back_every_row_in_order(lengths, replicas):
    # B != replicas, uneven token counts, and fewer rows than replicas (then one row per part).
    B, R = len(lengths), 3
    table = torch.arange(B * R, dtype=torch.float32).view(B, R)  # (B, R): row i holds 3i, 3i+1, 3i+2
    parts = token_balanced_parts(lengths, min(replicas, B))
    assert len(parts) == min(replicas, B) and all(parts)
    joined = join_rows(parts, [table[torch.tensor(p)] for p in parts])
    torch.testing.assert_close(joined, table, rtol=0, atol=0)


def test_join_rows_refuses_parts_that_lose_or_double_a_row():
    with pytest.raises(ValueError, match=r"0..3 \(as many as they hold in all\) each once, got \[\[0, 1\], \[1, 2\]\]"):
        join_rows([[0, 1], [1, 2]], [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match="a part of 2 rows came back with 1"):
        join_rows([[0, 1], [2]], [torch.zeros(1), torch.zeros(1)])


# ---- the clients over fake replicas (a fake of ray.wait / ray.get) ----------------------------


class Ref:
    """A fake ObjectRef: the value of a call that has already run (or the exception it raised)."""

    def __init__(self, value) -> None:
        self.value = value


def _fake_wait(refs, num_returns, timeout, fetch_local):
    return [refs[0]], list(refs[1:])


def _fake_get(ref):
    if isinstance(ref.value, BaseException):
        raise ref.value
    return ref.value


@pytest.fixture()
def fake_ray(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "wait", _fake_wait)
    monkeypatch.setattr(ray, "get", _fake_get)
    return ray


class Store:
    """Stands in for ray.put: an object is ("obj", n, batch); ``puts`` lists what went in."""

    def __init__(self) -> None:
        self.puts: list[ExperienceBatch] = []

    def __call__(self, batch: ExperienceBatch):
        self.puts.append(batch)
        return ("obj", len(self.puts), batch)


def row_logprobs(batch: ExperienceBatch, temperature: float) -> torch.Tensor:
    """What a fake reference replica answers: (B, R), a value per row and position."""
    return torch.where(batch.response_mask, batch.prompt_index[:, None] + batch.rollout_logprobs / temperature, 0.0)


def row_scores(batch: ExperienceBatch) -> torch.Tensor:
    return 10.0 * batch.prompt_index.float() + batch.response_mask.sum(-1)


class Replica:
    """A fake reference or reward actor. ``fails``: exceptions its calls raise in turn (then it answers)."""

    def __init__(self, fails: list | None = None) -> None:
        self.fails, self.parts = list(fails or []), []
        self.logprobs = SimpleNamespace(remote=lambda obj, t: self._answer(obj, row_logprobs, t))
        self.score = SimpleNamespace(remote=lambda obj: self._answer(obj, row_scores))

    def _answer(self, obj, fn, *args) -> Ref:
        _, _, part = obj
        self.parts.append(part.prompt_index.tolist())
        return Ref(self.fails.pop(0) if self.fails else fn(part, *args))


def _batch(lengths: list[int]) -> ExperienceBatch:
    """One sample per prompt (prompt index = row), responses of ``lengths`` tokens, prompts of 1-3."""
    gen = Generation([], [], [], [], [])
    for i, n in enumerate(lengths):
        gen.prompt_ids.append([10 + i] * (1 + i % 3))
        gen.response_ids.append([3 + (i + j) % 40 for j in range(n)])
        gen.logprobs.append([-0.1 * (j + 1) for j in range(n)])
        gen.finish_reasons.append("length")
        gen.prompt_index.append(i)
    return pack_generation(gen, PAD, [EOS])


def test_reference_split_over_two_replicas_by_tokens_joins_in_order(fake_ray):
    from rlhf_ray.runtime.groups import ReferenceClient, SharedBatch

    batch = _batch([9, 1, 1, 1, 8])  # B=5 over 2 replicas; tokens: 10, 3, 4, 2, 10
    replicas = [Replica(), Replica()]
    pending = ReferenceClient(replicas, 30.0).logprobs(SharedBatch(batch, put=Store()), 0.5)
    torch.testing.assert_close(pending.result(), row_logprobs(batch, 0.5), rtol=0, atol=0)
    assert pending.sources == [("reference", 0), ("reference", 1)]
    tokens = batch.attention_mask.sum(-1).tolist()
    got = [r.parts[0] for r in replicas]
    assert sorted(i for p in got for i in p) == [0, 1, 2, 3, 4]
    assert [sum(tokens[i] for i in p) for p in got] == [14, 15]  # by tokens, not 3 rows and 2
    assert got == token_balanced_parts(tokens, 2)


def test_reward_functions_split_by_samples_and_a_reward_model_by_tokens(fake_ray):
    from rlhf_ray.runtime.groups import RewardClient, SharedBatch

    batch = _batch([20, 1, 1, 1, 1, 1])  # tokens 21 and 16 over the other five
    for by_tokens, sizes in ((False, [3, 3]), (True, [1, 5])):
        replicas = [Replica(), Replica()]
        scores = RewardClient(replicas, 30.0, by_tokens=by_tokens).score(SharedBatch(batch, put=Store())).result()
        torch.testing.assert_close(scores, row_scores(batch), rtol=0, atol=0)
        assert [len(r.parts[0]) for r in replicas] == sizes


def test_fewer_rows_than_replicas_leaves_the_others_idle(fake_ray):
    from rlhf_ray.runtime.groups import RewardClient, SharedBatch

    batch = _batch([2, 3])
    replicas = [Replica() for _ in range(4)]
    pending = RewardClient(replicas, 30.0).score(SharedBatch(batch, put=Store()))
    torch.testing.assert_close(pending.result(), row_scores(batch), rtol=0, atol=0)
    assert [len(r.parts) for r in replicas] == [1, 1, 0, 0]
    assert pending.sources == [("reward", 0), ("reward", 1)]


def test_one_replica_each_shares_one_object_of_the_whole_batch(fake_ray):
    # As before replicas: the batch goes to the object store once, reference and reward read it.
    from rlhf_ray.runtime.groups import ReferenceClient, RewardClient, SharedBatch

    batch, store = _batch([4, 2, 3]), Store()
    shared = SharedBatch(batch, put=store)
    ReferenceClient([Replica()], 30.0).logprobs(shared, 1.0).result()
    RewardClient([Replica()], 30.0, by_tokens=False).score(shared).result()
    assert len(store.puts) == 1 and store.puts[0] is batch
    # Two replicas each, split alike (both by tokens): each part is put once and read by both roles.
    store = Store()
    shared = SharedBatch(batch, put=store)
    ReferenceClient([Replica(), Replica()], 30.0).logprobs(shared, 1.0).result()
    RewardClient([Replica(), Replica()], 30.0, by_tokens=True).score(shared).result()
    assert sorted(p.prompt_index.tolist() for p in store.puts) == [[0, 1], [2]]  # tokens 5 + 4 and 6


def test_a_failed_replica_is_named_by_its_index(fake_ray):
    from ray.exceptions import RayActorError

    from rlhf_ray.runtime.groups import RewardClient, SharedBatch

    batch = _batch([3, 3, 3, 3])
    client = RewardClient([Replica(), Replica(fails=[RayActorError()])], 30.0)
    with pytest.raises(RemoteCallError) as info:
        client.score(SharedBatch(batch, put=Store())).result()
    assert (info.value.kind, info.value.source) == ("died", ("reward", 1))
    assert "reward scoring: reward replica 1 died" in str(info.value)


def test_replica_names():
    assert [describe(("reference", i)) for i in range(3)] == ["reference", "reference replica 1",
                                                             "reference replica 2"]
    assert describe(("reward", 0)) == "reward" and describe(("reward", 2)) == "reward replica 2"


# ---- a killed replica is replaced and the iteration redone (the loop, recovery, real clients) --


class ReplicaRoles:
    """The part of ``Roles`` recovery uses, over the real clients: ``replace`` puts a fresh fake
    replica in the failed one's place."""

    def __init__(self, reference, reward) -> None:
        self.reference, self.reward, self.replaced = reference, reward, []
        self.learners = SimpleNamespace(load_checkpoint=None)

    def lost_node(self, source) -> None:  # every node stays up here
        return None

    def replace(self, source) -> None:
        role, i = source
        self.replaced.append(source)
        getattr(self, role).actors[i] = Replica()


def _replica_coordinator(reference_actors, reward_actors, store):
    from rlhf_ray.coordinator.loop import PPOCoordinator
    from rlhf_ray.runtime.groups import ReferenceClient, RewardClient, SharedBatch

    roles = ReplicaRoles(ReferenceClient(reference_actors, 30.0), RewardClient(reward_actors, 30.0, by_tokens=False))
    cfg = _config(rollout={"prompts_per_iteration": 5, "samples_per_prompt": 1, "max_new_tokens": 5,
                           "num_engines": 1}, learner={"num_ranks": 1, "micro_batch_size": 5})
    coord = PPOCoordinator(cfg, _prompts(), PAD, [EOS], FakeRollout(), roles.reference, roles.reward,
                           FakeLearners(), FakeSync(), put=lambda batch: SharedBatch(batch, put=store))
    return coord, roles


def test_a_killed_reward_replica_is_replaced_and_the_iteration_redone_once(fake_ray, tmp_path):
    from ray.exceptions import RayActorError

    baseline, _ = _replica_coordinator([Replica()], [Replica()], Store())
    expected = [baseline.step() for _ in range(2)]

    coord, roles = _replica_coordinator([Replica(), Replica()], [Replica(), Replica()], Store())
    rows, say = [], []
    rec = Recovery(SimpleNamespace(resources=SimpleNamespace(max_actor_restarts=3, max_learner_restarts=0)), roles,
                   coord, str(tmp_path), coord.state_dict(), say=say.append)
    while coord.iteration < 2:
        if coord.iteration == 1 and not roles.replaced:
            roles.reward.actors[1] = Replica(fails=[RayActorError()])  # dies in iteration 1's score phase
        try:
            rows.append(coord.step())
        except RemoteCallError as exc:
            assert rec.handle(exc) == 1
    assert roles.replaced == [("reward", 1)]
    assert say == ["reward replica 1 died (phase score); replacing it and redoing iteration 1"]
    assert [r["iteration"] for r in rows] == [0, 1]  # nothing lost, nothing twice
    for got, want in zip(rows, expected):  # the same batches scored as by one replica each
        for key in ("samples", "reward_mean", "reward_std", "kl_mean", "response_tokens"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert rec.counters()["faults/actor_restarts"] == 1.0


# ---- placement and config ----------------------------------------------------------------------


def test_placement_has_one_bundle_per_replica():
    cfg = config_from_dict({"reference": {"replicas": 2}, "reward": {"replicas": 3},
                            "resources": {"strategy": "SPREAD", "reference": {"num_cpus": 0.5, "num_gpus": 1},
                                          "reward": {"num_cpus": 0.25}}})
    plan = {p.role: p for p in placement_plan(cfg)}
    assert plan["reference"] == RolePlacement("reference", 2, {"CPU": 0.5, "GPU": 1.0}, "SPREAD")
    assert plan["reward"] == RolePlacement("reward", 3, {"CPU": 0.25}, "SPREAD")
    from rlhf_ray.runtime.placement import PlacementError

    with pytest.raises(PlacementError, match=r"GPU: plan needs 2, cluster has 1(.|\n)*--reference.replicas"):
        check_fits(placement_plan(cfg), {"CPU": 64.0, "GPU": 1.0})


def _errors(**sections) -> str:
    with pytest.raises(ConfigError) as info:
        validate(config_from_dict(sections))
    return str(info.value)


def test_replicas_and_concurrency_must_be_positive():
    msg = _errors(reference={"replicas": 0}, reward={"replicas": 0, "concurrency": 0})
    for flag in ("--reference.replicas", "--reward.replicas", "--reward.concurrency"):
        assert f"{flag} must be > 0 (got 0)" in msg
    msg = _errors(reward={"samples_per_call": -1, "function_timeout_s": -2, "http_backoff_s": -1})
    assert "--reward.samples_per_call must be >= 0 (got -1)" in msg
    assert "--reward.function_timeout_s must be >= 0 (got -2" in msg and "--reward.http_backoff_s must be >= 0" in msg


def test_reference_replicas_are_refused_where_the_learners_compute_the_reference():
    lora = {"lora": {"rank": 8, "alpha": 16}}
    msg = _errors(model=lora, reference={"replicas": 2})
    assert "--reference.replicas 2 has no effect with reference.from_learner, here from LoRA" in msg
    assert "--reference.from_learner false" in msg
    msg = _errors(model=lora, reference={"replicas": 2, "from_learner": True})
    assert "here from --reference.from_learner true" in msg
    validate(config_from_dict({"model": lora, "reference": {"replicas": 2, "from_learner": False}}))


def test_concurrency_is_refused_for_a_reward_model_and_the_function_timeout_for_an_endpoint():
    model = {"kind": "model", "model_path": "/rm"}
    assert "use --reward.replicas to score on several actors" in _errors(reward={**model, "concurrency": 4})
    assert "--reward.samples_per_call" in _errors(reward={**model, "samples_per_call": 1})
    msg = _errors(reward={"kind": "http", "url": "http://127.0.0.1:1/score", "function_timeout_s": 5})
    assert "time out after --reward.http_timeout_s" in msg
    validate(config_from_dict({"reward": {**model, "replicas": 4}, "reference": {"replicas": 2}}))
    validate(config_from_dict({"reward": {"kind": "http", "url": "http://127.0.0.1:1/score", "concurrency": 32,
                                          "samples_per_call": 1, "replicas": 2}}))


def test_the_new_options_are_in_the_help():
    from rlhf_ray.config import fields_help

    text = fields_help()
    for name in ("reference.replicas", "reward.replicas", "reward.concurrency", "reward.samples_per_call",
                 "reward.function_timeout_s", "reward.http_backoff_s"):
        assert name in text, name
