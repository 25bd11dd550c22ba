"""Labels reach rewards: a prompt record's fields besides the prompt (``{"prompt": ..., "answer":
...}``) stay with their prompt through the loader's drops and splits, and reach a reward function
as keyword arguments, one value per sample, on every path: in calls cut by reward.samples_per_call
and reward.concurrency (plain and async), over HTTP, split over reward replicas, in the start-up
probe and in the gold check. A function that takes only (prompts, responses) gets none of them.

The functions under test answer with values read from the fields they got, so a value that
reaches the wrong sample shows in the scores. No Ray."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import threading

import pytest
import torch

from rlhf_ray.batch import Generation, pack_generation
from rlhf_ray.config import DataConfig
from rlhf_ray.data.prompts import PromptSet, load_prompts, split_holdout
from rlhf_ray.reward_calls import score_in_calls, slice_columns
from rlhf_ray.reward_server import make_server, post_scores
from rlhf_ray.rewards import FieldParameters, field_parameters
from tests.unit.test_frozen_replicas import Ref, Store, _batch, fake_ray  # noqa: F401 (a fixture)
from tests.unit.test_prompts import WordTokenizer, _jsonl

# ---- the prompt set keeps each record's fields with its prompt -------------------------------


def _records(tmp_path) -> str:
    lines = [json.dumps({"prompt": "a " * (1 + i % 4), "answer": str(100 + i), **({"case": [i]} if i % 3 else {})})
             for i in range(12)]
    return _jsonl(tmp_path, lines[:5] + [""] + lines[5:])  # a blank line does not shift the fields


def test_fields_stay_with_their_prompts_through_drops_and_the_holdout(tmp_path):
    # Prompts of 1..4 words (+ BOS); max 4 tokens drops those of 4 words: i = 3, 7, 11.
    out = load_prompts(DataConfig(prompts=_records(tmp_path), max_prompt_tokens=4, too_long="drop"), WordTokenizer(),
                       seed=0)
    kept = [i for i in range(12) if i % 4 != 3]
    assert (out.dropped, out.blank) == (3, 1)
    assert out.fields == [{"answer": str(100 + i), **({"case": [i]} if i % 3 else {})} for i in kept]
    train, held = split_holdout(out, 3, seed=0)
    for part in (train, held):
        assert len(part.fields) == len(part.token_ids) == len(part.texts)
        for text, fields in zip(part.texts, part.fields):  # a prompt of k words is record i with i % 4 == k - 1
            assert (int(fields["answer"]) - 100) % 4 == len(text.split()) - 1
    assert sorted(f["answer"] for f in train.fields + held.fields) == sorted(f["answer"] for f in out.fields)


def test_columns_give_one_value_per_sample_and_none_where_a_record_lacks_the_field(tmp_path):
    out = load_prompts(DataConfig(prompts=_records(tmp_path)), WordTokenizer(), seed=0)
    assert out.field_names() == ["answer", "case"]
    assert out.columns([2, 0, 0, 1]) == {"answer": ["102", "100", "100", "101"], "case": [[2], None, None, [1]]}
    assert out.select([3, 1]).fields == [out.fields[3], out.fields[1]]


def test_prompts_without_fields_have_no_columns(tmp_path):
    builtin = load_prompts(DataConfig(prompts="builtin:digits", num_builtin_prompts=4), WordTokenizer(), seed=0)
    assert builtin.fields == [{}] * 4 and builtin.columns([0, 1]) == {}
    plain = load_prompts(DataConfig(prompts=_jsonl(tmp_path, ['{"prompt": "a b"}', '{"prompt": "c"}'])),
                         WordTokenizer(), seed=0)
    assert plain.columns([1, 0]) == {}
    made = PromptSet(["x"], [[1]], 0, 0)  # constructors from before fields existed
    assert made.fields == [] and made.columns([0, 0]) == {} and split_holdout(PromptSet(["x", "y"], [[1], [2]], 0, 0),
                                                                            1, 0)[1].fields == []


def test_a_custom_prompt_field_is_not_among_the_fields(tmp_path):
    path = _jsonl(tmp_path, ['{"question": "a?", "prompt": "kept", "answer": 1}'])
    out = load_prompts(DataConfig(prompts=path, prompt_field="question"), WordTokenizer(), seed=0)
    assert out.fields == [{"prompt": "kept", "answer": 1}]


# ---- which fields a function takes -------------------------------------------------------------


def two(prompts, responses):
    return [0.0] * len(responses)


def named(prompts, responses, answer, case=None):
    return [0.0] * len(responses)


def everything(prompts, responses, **fields):
    return [0.0] * len(responses)


def test_a_function_takes_the_fields_it_names_all_with_kwargs_none_with_two_parameters():
    columns = {"answer": ["1"], "case": [None], "other": [3]}
    assert field_parameters(two).pick(columns) == {}
    assert field_parameters(named) == FieldParameters(("prompts", "responses"), ("answer", "case"), ("answer",), False)
    assert field_parameters(named).pick(columns) == {"answer": ["1"], "case": [None]}
    assert field_parameters(everything).pick(columns) == columns
    assert field_parameters(len).pick(columns) == {}  # no readable signature: called with two lists


def test_a_required_parameter_no_record_has_is_a_clear_error():
    with pytest.raises(ValueError, match=r"reward function f\.py:named has a parameter 'answer' without a default, "
                                         r"and no record of --data.prompts has a field 'answer' to fill it \(their fields besides the prompt: 'label'\)"):
        field_parameters(named).check(["label"], "reward function f.py:named")
    field_parameters(named).check(["answer"], "reward function f.py:named")  # 'case' has a default
    with pytest.raises(ValueError, match="a field 'responses', the name of the parameter its prompts or responses"):
        field_parameters(everything).check(["responses"], "reward function f.py:everything")


# ---- calls cut by samples_per_call and concurrency ---------------------------------------------


def test_each_call_gets_its_samples_values_of_each_field():
    seen = []
    lock = threading.Lock()

    def fn(prompts, responses, answer):
        with lock:
            seen.append(list(answer))
        return [float(a) + len(r) / 100 for r, a in zip(responses, answer)]

    prompts, responses = [f"p{i}" for i in range(6)], ["x" * i for i in range(6)]
    answer = [10 * i for i in range(6)]
    for spc, conc in ((1, 2), (2, 1), (0, 4)):
        seen.clear()
        out = score_in_calls(fn, prompts, responses, fields={"answer": answer}, samples_per_call=spc,
                             concurrency=conc)
        assert out == [10 * i + i / 100 for i in range(6)]
        assert sorted(v for call in seen for v in call) == answer and all(seen)
    assert slice_columns({"a": [1, 2, 3], "b": "xyz"}, [2, 0]) == {"a": [3, 1], "b": ["z", "x"]}
    with pytest.raises(ValueError, match="field 'answer' has 5 values for 6 responses"):
        score_in_calls(fn, prompts, responses, fields={"answer": answer[:5]})


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from rlhf_ray.tiny_models import build_tokenizer

    path = tmp_path_factory.mktemp("policy")
    build_tokenizer(seed=0, vocab_size=300).save_pretrained(path)
    return str(path)


def _scorer(policy: str, **reward):
    from rlhf_ray.config import config_from_dict
    from rlhf_ray.workers.frozen import RewardScorer, RewardSpec

    return RewardScorer(RewardSpec.from_config(config_from_dict({"model": {"path": policy}, "reward": reward})))


def _text_batch(n: int):
    """``n`` samples whose responses decode to 1..n times the same character."""
    seven = 3 + ord("7")  # byte-level ids: 4 specials first
    gen = Generation([[5 + ord("q")]] * n, [[seven] * (i + 1) for i in range(n)],
                     [[0.0] * (i + 1) for i in range(n)], ["stop"] * n, list(range(n)))
    return pack_generation(gen, 0, [2])


REWARDS = """
import asyncio

GOT = []

def exact(prompts, responses, answer):
    GOT.append(len(responses))
    return [1.0 if r == a else 0.0 for r, a in zip(responses, answer)]

async def exact_async(prompts, responses, answer):
    await asyncio.sleep(0)
    return [1.0 if r == a else 0.0 for r, a in zip(responses, answer)]

def count_fields(prompts, responses, **fields):
    return [float(len(fields)) + (fields["answer"][i] == r) for i, r in enumerate(responses)]

def first_labels(prompts, responses, label):
    assert label == ["1", "2"], f"the probe's prompts are the first two: {label}"
    return [0.0] * len(responses)

def length(prompts, responses):
    return [float(len(r)) for r in responses]
"""


@pytest.fixture()
def rewards_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(textwrap.dedent(REWARDS))
    return str(path)


def _answers(scorer) -> dict[str, list]:
    """Fields of _text_batch(4) whose answer is the response of rows 0, 2 and 3, not of row 1."""
    responses = scorer.decode(_text_batch(4))[1]
    return {"answer": [responses[0], "x", responses[2], responses[3]], "case": [1, None, 3, 4]}


@pytest.mark.parametrize("fn", ["exact", "exact_async"])
def test_the_reward_role_gives_each_sample_its_answer_in_calls_of_one_two_at_once(policy_dir, rewards_file, fn):
    scorer = _scorer(policy_dir, function=f"{rewards_file}:{fn}", concurrency=2, samples_per_call=1)
    torch.testing.assert_close(scorer.score(_text_batch(4), _answers(scorer)), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    if fn == "exact":
        assert scorer.fn.__globals__["GOT"] == [1, 1, 1, 1]  # four calls of one sample


def test_a_two_argument_function_still_works_when_the_records_have_fields(policy_dir, rewards_file):
    scorer = _scorer(policy_dir, function=f"{rewards_file}:length", concurrency=2)
    torch.testing.assert_close(scorer.score(_text_batch(4), _answers(scorer)), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(scorer.score(_text_batch(4)), torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_a_kwargs_function_gets_every_field(policy_dir, rewards_file):
    scorer = _scorer(policy_dir, function=f"{rewards_file}:count_fields", samples_per_call=3)
    torch.testing.assert_close(scorer.score(_text_batch(4), _answers(scorer)), torch.tensor([3.0, 2.0, 3.0, 3.0]))


# ---- over HTTP ---------------------------------------------------------------------------------


def _serve(fn):
    srv = make_server(fn, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/score"


def test_fields_travel_in_the_request_body_to_the_servers_function(policy_dir):
    bodies = []

    def exact(prompts, responses, answer):
        bodies.append(list(answer))
        return [1.0 if r == a else 0.0 for r, a in zip(responses, answer)]

    srv, url = _serve(exact)
    try:
        scorer = _scorer(policy_dir, kind="http", url=url, function=None, concurrency=2, samples_per_call=2)
        torch.testing.assert_close(scorer.score(_text_batch(4), _answers(scorer)), torch.tensor([1.0, 0.0, 1.0, 1.0]))
        answer = _answers(scorer)["answer"]
        assert sorted(bodies) == sorted([answer[:2], answer[2:]])
        with pytest.raises(ValueError, match="TypeError.*answer"):  # the server's function needs the field
            post_scores(url, ["p"], ["a"], retries=0)
    finally:
        srv.shutdown()
        srv.server_close()
    srv, url = _serve(two)  # a server's two-argument function ignores the fields it is sent
    try:
        assert post_scores(url, ["p", "q"], ["a", "b"], fields={"answer": ["a", "c"]}) == [0.0, 0.0]
    finally:
        srv.shutdown()
        srv.server_close()


# ---- split over reward replicas ----------------------------------------------------------------


class FieldReplica:
    """A fake reward actor whose score is a row's ``answer`` field; records the rows it was sent."""

    def __init__(self) -> None:
        self.got: list[tuple[list[int], dict | None]] = []
        self.score = type("Method", (), {"remote": self._score})()

    def _score(self, obj, fields=None) -> Ref:
        _, _, part = obj
        self.got.append((part.prompt_index.tolist(), fields))
        return Ref(torch.tensor([float(a) for a in fields["answer"]]) if fields else torch.zeros(len(part)))


def test_each_reward_replica_gets_its_parts_rows_of_every_field(fake_ray):
    from rlhf_ray.runtime.groups import RewardClient, SharedBatch

    batch = _batch([20, 1, 1, 1, 1, 1])  # by tokens over 2 replicas: row 0 alone, rows 1-5 together
    columns = {"answer": [100 + i for i in range(6)], "case": [f"c{i}" for i in range(6)]}
    replicas = [FieldReplica(), FieldReplica()]
    scores = RewardClient(replicas, 30.0, by_tokens=True).score(SharedBatch(batch, put=Store()), columns).result()
    torch.testing.assert_close(scores, torch.tensor([100.0 + i for i in range(6)]))
    for r in replicas:
        (rows, fields), = r.got
        assert fields == {name: [values[i] for i in rows] for name, values in columns.items()}
    assert sorted(len(r.got[0][0]) for r in replicas) == [1, 5]
    replicas = [FieldReplica(), FieldReplica()]  # no fields: the call is as before (no extra argument)
    RewardClient(replicas, 30.0, by_tokens=False).score(SharedBatch(batch, put=Store())).result()
    assert [r.got[0][1] for r in replicas] == [None, None]
    with pytest.raises(ValueError, match="field 'answer' has 5 values for a batch of 6 rows"):
        RewardClient(replicas, 30.0).score(SharedBatch(batch, put=Store()), {"answer": [1] * 5})


# ---- the start-up probe and pre-flight ---------------------------------------------------------


def test_the_probe_passes_the_fields_and_names_a_missing_one(rewards_file):
    from rlhf_ray.coordinator.preflight import probe_reward_function

    probe_reward_function(f"{rewards_file}:exact", ["p"], 30, {"answer": ["", "?"]})
    with pytest.raises(ValueError, match=r"parameter 'answer' without a default, and no record of --data.prompts "
                                         r"has a field 'answer' .*\(their fields besides the prompt: none\)"):
        probe_reward_function(f"{rewards_file}:exact", ["p"], 30)
    probe_reward_function(f"{rewards_file}:length", ["p"], 30, {"answer": ["", "?"]})  # two arguments: as before


def test_preflight_probes_with_the_records_fields(tmp_path, rewards_file):
    from rlhf_ray.config import load_config
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.tiny_models import build_tiny_model

    model = str(build_tiny_model(tmp_path / "m", arch="llama", seed=0))
    path = _jsonl(tmp_path, [json.dumps({"prompt": f"What is {i}+1?", "label": str(i + 1)}) for i in range(8)])
    overrides = {"model.path": model, "data.prompts": path, "eval.every": 0}
    with pytest.raises(ValueError, match=r"no record of --data.prompts has a field 'answer' .*: 'label'\)"):
        prepare_inputs(load_config(None, {**overrides, "reward.function": f"{rewards_file}:exact"}))
    inputs = prepare_inputs(load_config(None, {**overrides, "reward.function": f"{rewards_file}:first_labels"}))
    assert inputs.prompts.columns([1]) == {"label": ["2"]}
    gold = {**overrides, "reward.function": f"{rewards_file}:length", "reward.gold": f"{rewards_file}:exact"}
    with pytest.raises(ValueError, match=r"reward.gold .*:exact has a parameter 'answer' without a default"):
        prepare_inputs(load_config(None, gold))
    # Under dynamic sampling too: the coordinator keeps each kept sample's prompt (row_prompts).
    grouped = {**gold, "reward.gold": f"{rewards_file}:first_labels", "rollout.samples_per_prompt": 2,
               "ppo.dynamic_sampling": True}
    prepare_inputs(load_config(None, grouped))


def test_dynamic_sampling_keeps_each_rows_prompt_and_fields():
    """Prompt i's field k is i % 2; the reward gives row j of a group (0, k): groups of even prompts
    score alike and are dropped. Every kept row must be an odd prompt's, and the fields the reward
    saw for it must be that prompt's."""
    from tests.unit.test_coordinator import PAD, EOS, FakeLearners, FakeReference, FakeRollout, FakeSync, _put

    from rlhf_ray.config import config_from_dict
    from rlhf_ray.coordinator.loop import PPOCoordinator
    from rlhf_ray.runtime.pending import Done

    class ByField:
        def score(self, shared, fields=None):
            batch = shared[1]
            scores = [float(fields["k"][j]) * (j % 2) for j in range(len(batch))]
            return Done(torch.tensor(scores))

    ids = [[10 + i, 11] for i in range(12)]
    prompts = PromptSet([f"p{i}" for i in range(12)], ids, 0, 0, fields=[{"k": i % 2} for i in range(12)])
    cfg = config_from_dict({"seed": 1, "rollout": {"prompts_per_iteration": 3, "samples_per_prompt": 2,
                                                   "max_new_tokens": 5},
                            "ppo": {"mini_batches": 1, "estimator": "grpo", "dynamic_sampling": True,
                                    "max_extra_generations": 4},
                            "learner": {"num_ranks": 1, "micro_batch_size": 6}})
    coord = PPOCoordinator(cfg, prompts, PAD, [EOS], FakeRollout(), FakeReference(), ByField(), FakeLearners(),
                           FakeSync(), put=_put)
    coord.step()
    assert len(coord.row_prompts) == 6 and all(i % 2 == 1 for i in coord.row_prompts)
    assert prompts.columns(coord.row_prompts) == {"k": [1] * 6}


# ---- the gold check ----------------------------------------------------------------------------


def test_the_gold_check_gets_each_rows_fields_in_training_and_evaluation(tmp_path):
    from rlhf_ray.coordinator.gold import GoldCheck, read_eval_samples
    from tests.unit.test_coordinator import _prompts
    from tests.unit.test_run import CharTokenizer, _rows, _run

    # Each record's "answer" is its own prompt's decoded text: the gold value is 1 only where a row
    # got the fields of the prompt it was generated from.
    gold_file = tmp_path / "gold.py"
    gold_file.write_text("def own(prompts, responses, answer):\n"
                         "    return [float(p == a) for p, a in zip(prompts, answer)]\n")
    run = _run(tmp_path / "run", eval_every=2, reward={"gold": f"{gold_file}:own"})
    tok = CharTokenizer()

    def labelled(prompts: PromptSet) -> PromptSet:
        return dataclasses.replace(prompts, fields=[{"answer": tok.decode(ids)} for ids in prompts.token_ids])

    run.inputs.prompts, run.inputs.eval_prompts = labelled(_prompts()), labelled(_prompts(2))
    run.inputs.gold = GoldCheck(f"{gold_file}:own", tok)
    run.iterate()
    run.finish()
    metrics = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [m["gold_mean"] for m in metrics] == [1.0] * 4
    assert any(m["prompt_indices"] != list(range(len(m["prompt_indices"]))) for m in metrics)  # not 0..P-1 only
    rows = read_eval_samples(tmp_path / "run" / "eval_samples" / "iter_000004.jsonl")
    assert rows and [r["gold"] for r in rows] == [1.0] * len(rows)
