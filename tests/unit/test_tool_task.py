"""The tool-use demo task: the calculator environment, its data, its reward.

- ``rlhf_ray.envs.calculator``: the parser (precedence, unary minus, parentheses, malformed input
  refused with a reason), the environment (no call: done; the LAST complete call is evaluated; a bad
  expression is an error observation and a counted tool error, the episode goes on) and the
  contract of ``rlhf_ray.envs.base`` (loadable by ``rollout.env``, built with no arguments).
- ``rlhf_ray.data.tool_task``: held-out pairs in no training file, answer fields right, the noisy
  demonstrator's fractions and kinds of mistakes, demonstrations that are real episodes (observation
  from the calculator; the text tokenises as the turns and the observation do one by one).
- ``rlhf_ray.rewards.tool_answer_correct``: hand cases, with the answers given as record fields or
  read from the prompt.
"""

from __future__ import annotations

import json

import pytest

from rlhf_ray.data import demo_data
from rlhf_ray.data.tool_task import (HIGH, LOW, answer_turn, demonstration, episode_text, final_answer, miscopied,
                                     operands_of, outcome, prompt_of, prompt_records, sft_records, split_pairs,
                                     task_records, tool_turn)
from rlhf_ray.envs.base import Environment, StepResult, check_env, load_env_class
from rlhf_ray.envs.calculator import CalcError, CalculatorEnv, evaluate, find_calls
from rlhf_ray.rewards import tool_answer_correct

# ---- the calculator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("expression, value", [
    ("37*48", 1776), (" 37 * 48 ", 1776), ("2+3*4", 14), ("2*3+4*5", 26), ("10-2-3", 5), ("(2+3)*4", 20),
    ("2*(3-5)", -4), ("-3*-2", 6), ("--4", 4), ("7", 7), ("0*99", 0), ("1-2*3-4", -9),
])
def test_evaluate_follows_precedence_and_associativity(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression, reason", [
    ("", "ends early"), ("2*", "ends early"), ("1/2", "unexpected character '/'"), ("3 4", "4 after a complete"),
    ("((1)", "'(' without its ')'"), ("2**3", "'*' where a number belongs"), ("abc", "unexpected character 'a'"),
    ("1+)", "')' where a number belongs"), ("__import__('os')", "unexpected character '_'"),
])
def test_evaluate_refuses_malformed_input_with_a_reason(expression, reason):
    with pytest.raises(CalcError, match=reason.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        evaluate(expression)


def test_evaluate_limits_length_and_digits():
    assert evaluate("9" * 12) == 10 ** 12 - 1
    with pytest.raises(CalcError, match="13 digits"):
        evaluate("9" * 13)
    with pytest.raises(CalcError, match="65 characters"):
        evaluate("1+" * 32 + "1")
    assert evaluate("1+" * 31 + "1") == 32  # 63 characters


def test_find_calls_needs_the_closing_tag_and_keeps_order():
    assert find_calls(" <calc>1+1</calc> then <calc>2*3</calc>") == ["1+1", "2*3"]
    assert find_calls(" <calc>1+1") == []
    assert find_calls(" answer 12") == []


def _env(record: dict | None = None) -> CalculatorEnv:
    env = CalculatorEnv()
    env.reset(record or {"prompt": prompt_of(37, 48), "answer": 1776})
    return env


def test_a_call_gets_its_value_and_the_episode_goes_on():
    result = _env().step(" <calc> 37 * 48</calc>")
    assert result == StepResult(observation=" 1776.", reward=0.0, done=False, info={"tool_calls": 1, "tool_errors": 0})


def test_no_call_ends_the_episode():
    for text in (" answer 1776", "", " <calc> 37 * 48"):  # an unclosed call is no call
        result = _env().step(text)
        assert result.done and result.observation == "" and result.info == {"tool_calls": 0, "tool_errors": 0}


def test_the_last_call_of_the_turn_wins():
    assert _env().step(" <calc>1+1</calc> <calc>2*3</calc>").observation == " 6."
    assert _env().step(" <calc>2*3</calc> <calc>1/0</calc>").observation == " error."  # not the earlier good one


def test_a_malformed_call_is_an_error_observation_and_the_episode_goes_on():
    env = _env()
    bad = env.step(" <calc> 37 x 48</calc>")
    assert bad == StepResult(observation=" error.", reward=0.0, done=False, info={"tool_calls": 1, "tool_errors": 1})
    assert env.step(" <calc> 37 * 48</calc>").observation == " 1776."  # it may try again
    assert env.step(" answer 1776").done


def test_calculator_env_meets_the_environment_contract():
    cls = load_env_class("rlhf_ray.envs.calculator:CalculatorEnv")
    assert cls is CalculatorEnv and check_env("rlhf_ray.envs.calculator:CalculatorEnv", {}) is CalculatorEnv
    assert isinstance(CalculatorEnv(), Environment)
    assert CalculatorEnv(max_chars=8).step(" <calc>1+2+3+4+5</calc>").info["tool_errors"] == 1  # 9 characters
    with pytest.raises(ValueError, match="max_chars and max_digits must be >= 1"):
        CalculatorEnv(max_chars=0)


# ---- the data -------------------------------------------------------------------------------------


def _pair(prompt: str) -> frozenset:
    return frozenset(operands_of(prompt))


def test_split_holds_out_unordered_pairs_in_both_orders():
    train, held = split_pairs(seed=0, n_eval=50)
    assert not {frozenset(p) for p in train} & {frozenset(p) for p in held}
    assert len({frozenset(p) for p in held}) == 50
    assert all((b, a) in held for a, b in held) and all((b, a) in train for a, b in train)
    n = HIGH - LOW + 1
    assert len(train) + len(held) == n * n  # every ordered pair, squares once
    assert split_pairs(seed=0, n_eval=50) == (train, held) and split_pairs(seed=1, n_eval=50)[1] != held
    with pytest.raises(ValueError, match="n_eval must be in 1"):
        split_pairs(seed=0, n_eval=0)


def test_held_out_prompts_are_in_no_other_file_and_answers_are_the_products():
    records = task_records(seed=3, n_sft=600, n_prompts=300, n_eval=40)
    held = {_pair(r["prompt"]) for r in records["eval_prompts.jsonl"]}
    assert len(records["eval_prompts.jsonl"]) == len(held) * 2 - sum(len(p) == 1 for p in held)
    for name in ("sft.jsonl", "prompts.jsonl"):
        assert not {_pair(r["prompt"]) for r in records[name]} & held, name
    for name in ("prompts.jsonl", "eval_prompts.jsonl"):
        for r in records[name]:
            a, b = operands_of(r["prompt"])
            assert set(r) == {"prompt", "answer"} and r["answer"] == a * b
    assert len(records["prompts.jsonl"]) == 300 and len({r["prompt"] for r in records["prompts.jsonl"]}) == 300


def _kinds(records: list[dict]) -> dict[str, int]:
    counts = {"direct": 0, "miscopy": 0, "right": 0}
    for r in records:
        o = outcome(r["prompt"], r["response"])
        counts["direct" if not o["called"] else "right" if o["copied"] else "miscopy"] += 1
    return counts


def test_the_demonstrators_noise_fractions():
    train, _ = split_pairs(seed=0, n_eval=200)
    records = sft_records(train, 4000, seed=0)
    counts = _kinds(records)
    assert abs(counts["direct"] / 4000 - 0.25) < 0.03
    assert abs(counts["miscopy"] / 4000 - 0.25) < 0.03
    assert abs(counts["right"] / 4000 - 0.5) < 0.03
    assert _kinds(sft_records(train, 2000, seed=0, direct=0.1, miscopy=0.0))["miscopy"] == 0
    with pytest.raises(ValueError, match="sum <= 1"):
        sft_records(train, 10, seed=0, direct=0.6, miscopy=0.5)


def test_each_kind_of_demonstration_makes_its_own_mistake_only():
    train, _ = split_pairs(seed=0, n_eval=200)
    for r in sft_records(train, 1000, seed=1):
        a, b = operands_of(r["prompt"])
        o, got = outcome(r["prompt"], r["response"]), final_answer(r["response"])
        calls = find_calls(r["response"])
        if not o["called"]:  # a direct guess: wrong, no call, a number in the products' range
            assert got != a * b and LOW * LOW <= got <= HIGH * HIGH and r["response"] == answer_turn(got)
            continue
        x, y = (int(s) for s in calls[0].split("*"))
        # the episode is real: the calculator's output follows the call, and the answer copies it
        assert r["response"] == tool_turn(x, y) + f" {x * y}." + answer_turn(x * y)
        if o["copied"]:
            assert o["correct"]
        else:  # one digit of one operand differs, still two digits
            wrong = [(s, t) for s, t in ((x, a), (y, b)) if s != t]
            assert len(wrong) == 1 and 10 <= wrong[0][0] <= 99
            s, t = (str(v) for v in wrong[0])
            assert sum(c != d for c, d in zip(s, t)) == 1


def test_miscopied_changes_exactly_one_digit_and_keeps_two():
    import random

    rng = random.Random(0)
    for x in (10, 55, 99):
        for _ in range(200):
            y = miscopied(x, rng)
            assert 10 <= y <= 99 and sum(c != d for c, d in zip(str(x), str(y))) == 1


def test_episode_text_is_the_calculators_episode():
    assert episode_text([tool_turn(37, 48), answer_turn(1776)]) == " <calc> 37 * 48</calc> 1776. answer 1776"
    assert episode_text([answer_turn(12), tool_turn(1, 2)]) == " answer 12"  # done after the first turn


@pytest.fixture(scope="module")
def tokenizer():
    from rlhf_ray.tiny_models import build_tokenizer

    return build_tokenizer(seed=0)


def test_demonstrations_tokenise_as_the_episodes_pieces_do(tokenizer):
    # SFT tokenises the whole response; a rollout appends turn and observation ids one by one. They
    # must agree, or SFT teaches token sequences the policy never sees in its episodes.
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for a in range(LOW, HIGH + 1, 7):
        for b in range(LOW, HIGH + 1, 3):
            turn, obs, ans = tool_turn(a, b), f" {a * b}.", answer_turn(a * b)
            assert ids(turn + obs + ans) == ids(turn) + ids(obs) + ids(ans), (a, b)
            # each operand is the same single token in the prompt and in the call: the policy copies tokens
            assert ids(f" {a}")[0] in ids(prompt_of(a, b)) and len(ids(f" {a}")) == 1


def test_demo_data_writes_the_tool_task(tmp_path):
    paths = demo_data.write_demo_data(str(tmp_path), seed=0, n_sft=50, n_prompts=40, task="tools", n_eval=10)
    assert list(paths) == list(demo_data.TASK_FILES["tools"])
    lines = {name: [json.loads(x) for x in open(p)] for name, p in paths.items()}
    assert len(lines["sft.jsonl"]) == 50 and len(lines["prompts.jsonl"]) == 40
    assert all("answer" in r for r in lines["eval_prompts.jsonl"])
    spec = json.loads((tmp_path / demo_data.SPEC_FILE).read_text())
    assert spec["task"] == "tools" and "n_pairs" not in spec


def test_demonstration_is_deterministic_for_a_seed():
    import random

    a = [demonstration(37, 48, random.Random(5), 0.25, 0.25) for _ in range(3)]
    b = [demonstration(37, 48, random.Random(5), 0.25, 0.25) for _ in range(3)]
    assert a == b
    assert prompt_records([(37, 48)], 5, seed=0) == [{"prompt": "Q: what is 37 * 48? A:", "answer": 1776}]


# ---- the reward -----------------------------------------------------------------------------------

P = prompt_of(37, 48)


@pytest.mark.parametrize("response, score", [
    (" <calc> 37 * 48</calc> 1776. answer 1776", 1.0),
    (" answer 1776", 1.0),                                      # right without the tool still counts
    (" <calc> 37 * 43</calc> 1591. answer 1591", 0.0),          # a mis-copied operand
    (" <calc> 37 * 48</calc> 1776. answer 1716", 0.0),          # the result mis-copied
    (" <calc> 37 * 48</calc> 1776.", 0.0),                      # no answer
    (" answer 1776 answer 12", 0.0),                            # the last answer counts
    (" answer 12 answer 1776", 1.0),
    (" answer 17760", 0.0), (" answer -1776", 0.0), (" answers 1776", 0.0), (" 1776", 0.0),
])
def test_tool_answer_correct_hand_cases(response, score):
    assert tool_answer_correct([P], [response], answer=[1776]) == [score]
    assert tool_answer_correct([P], [response]) == [score]  # the expected answer read from the prompt


def test_tool_answer_correct_reads_the_answer_field_not_the_prompt():
    responses = [" answer 5", " answer 6", " answer 7"]
    assert tool_answer_correct(["any prompt"] * 3, responses, answer=[5, "6", " 8 "]) == [1.0, 1.0, 0.0]


def test_tool_answer_correct_refuses_bad_inputs_with_a_reason():
    with pytest.raises(ValueError, match="answer field is 'x', not an integer"):
        tool_answer_correct([P], [" answer 1"], answer=["x"])
    with pytest.raises(ValueError, match="2 expected answers for 1 responses"):
        tool_answer_correct([P], [" answer 1"], answer=[1, 2])
    with pytest.raises(ValueError, match="not a calculator-task prompt"):
        tool_answer_correct(["Q: which is larger, 3 or 4? A:"], [" answer 4"])
