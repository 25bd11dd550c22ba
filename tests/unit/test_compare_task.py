"""The "which is larger" demo task: its gold check and its data (held-out pairs stay out)."""

from __future__ import annotations

import json
import re

import pytest

from rlhf_ray.data import compare_task
from rlhf_ray.data.demo_data import SPEC_FILE, ensure_demo_data, write_demo_data
from rlhf_ray.rewards import larger_number_correct


def _pair(prompt: str) -> tuple[int, int]:
    a, b = map(int, re.findall(r"\d+", prompt))
    return a, b


def test_gold_check_hand_cases():
    p = "Q: which is larger, 47 or 52? A:"
    got = larger_number_correct([p] * 7, [" 52", "52.", " 47", " 52 52", "", " 52 or 47", " fifty-two"])
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert larger_number_correct(["Q: which is larger, 90 or 9? A:"], [" 90"]) == [1.0]
    with pytest.raises(ValueError, match="not a 'which is larger' prompt"):
        larger_number_correct(["Q: what is 2 plus 3? A:"], [" 5"])


def test_held_out_pairs_never_appear_in_training_files(tmp_path):
    paths = write_demo_data(str(tmp_path), seed=3, n_sft=3000, n_pairs=3000, n_prompts=4000, task="compare",
                            n_eval=50)
    rows = {name: [json.loads(line) for line in open(path)] for name, path in paths.items()}
    held = {frozenset(_pair(r["prompt"])) for r in rows["eval_prompts.jsonl"]}
    assert len(rows["eval_prompts.jsonl"]) == 100 and len(held) == 50  # both orders of 50 pairs
    for name in ("sft.jsonl", "preference.jsonl", "prompts.jsonl"):
        seen = {frozenset(_pair(r["prompt"])) for r in rows[name]}
        assert not seen & held, name
    assert len(rows["prompts.jsonl"]) == 4000 and len({r["prompt"] for r in rows["prompts.jsonl"]}) == 4000


def test_demonstrations_are_noisy_and_preferences_prefer_the_gold_answer(tmp_path):
    paths = write_demo_data(str(tmp_path), seed=0, task="compare")
    sft = [json.loads(line) for line in open(paths["sft.jsonl"])]
    right = larger_number_correct([r["prompt"] for r in sft], [r["response"] for r in sft])
    assert 0.66 < sum(right) / len(right) < 0.74  # noise 0.3: readable and partly right
    prefs = [json.loads(line) for line in open(paths["preference.jsonl"])]
    prompts = [r["prompt"] for r in prefs]
    assert larger_number_correct(prompts, [r["chosen"] for r in prefs]) == [1.0] * len(prefs)
    assert larger_number_correct(prompts, [r["rejected"] for r in prefs]) == [0.0] * len(prefs)
    kinds = {"smaller": 0, "other": 0, "ramble": 0}
    for r in prefs:
        nums = [int(x) for x in r["rejected"].split()]
        a, b = _pair(r["prompt"])
        kinds["ramble" if len(nums) > 1 else "smaller" if nums[0] == min(a, b) else "other"] += 1
        if len(nums) > 1:
            assert nums[0] == max(a, b) and len(nums) <= 4  # the right answer, then more numbers
        else:
            assert nums[0] != max(a, b)
    assert 0.56 < kinds["smaller"] / len(prefs) < 0.64
    assert 0.16 < kinds["other"] / len(prefs) < 0.24 and 0.16 < kinds["ramble"] / len(prefs) < 0.24


def test_ensure_rewrites_a_directory_left_by_another_task(tmp_path):
    write_demo_data(str(tmp_path), seed=0, n_sft=20, n_pairs=20, n_prompts=20, task="digits")
    paths = ensure_demo_data(str(tmp_path), seed=0, task="compare")
    first = json.loads(open(paths["prompts.jsonl"]).readline())["prompt"]
    assert first.startswith("Q: which is larger")
    assert json.loads(open(tmp_path / SPEC_FILE).read())["task"] == "compare"
    mtime = (tmp_path / "sft.jsonl").stat().st_mtime_ns
    ensure_demo_data(str(tmp_path), seed=0, task="compare")  # the same set: left alone
    assert (tmp_path / "sft.jsonl").stat().st_mtime_ns == mtime


def test_split_needs_a_sensible_held_out_count():
    with pytest.raises(ValueError, match="n_eval must be in"):
        compare_task.split_pairs(0, 0)
