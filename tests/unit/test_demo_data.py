"""The offline demo data: deterministic, right answers, and preferences that favour digits."""

from __future__ import annotations

import json
import re

import pytest

from rlhf_ray.data import demo_data
from rlhf_ray.data.demo_data import answer_of, number_words, preference_records, sft_records, write_demo_data
from rlhf_ray.data.prompts import builtin_prompts
from rlhf_ray.rewards import digit_fraction


def _read(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_number_words():
    assert [number_words(n) for n in (0, 7, 13, 20, 42, 99, 100, 105, 342)] == [
        "zero", "seven", "thirteen", "twenty", "forty-two", "ninety-nine", "one hundred", "one hundred five",
        "three hundred forty-two"]
    with pytest.raises(ValueError):
        number_words(1000)


def test_answer_of_every_builtin_prompt_kind():
    assert answer_of("Q: what is 3 plus 4? A:") == (7, None)
    assert answer_of("the cat counts 12 apples. How many?") == (12, "apples")
    assert answer_of("Write the number after 9:") == (10, None)
    for p in builtin_prompts("digits", 200, seed=5):  # PPO's prompts all parse
        answer_of(p)
    with pytest.raises(ValueError, match="not a builtin"):
        answer_of("hello")


def test_files_are_deterministic_per_seed(tmp_path):
    a = write_demo_data(str(tmp_path / "a"), seed=0, n_sft=50, n_pairs=40, n_prompts=30)
    b = write_demo_data(str(tmp_path / "b"), seed=0, n_sft=50, n_pairs=40, n_prompts=30)
    c = write_demo_data(str(tmp_path / "c"), seed=1, n_sft=50, n_pairs=40, n_prompts=30)
    assert list(a) == list(demo_data.TASK_FILES["digits"])
    for name in a:
        assert open(a[name]).read() == open(b[name]).read()
        assert open(a[name]).read() != open(c[name]).read()
    assert [len(_read(a[n])) for n in a] == [50, 40, 30]
    assert set(_read(a["sft.jsonl"])[0]) == {"prompt", "response"}
    assert set(_read(a["preference.jsonl"])[0]) == {"prompt", "chosen", "rejected"}
    assert set(_read(a["prompts.jsonl"])[0]) == {"prompt"}


def _number_in(text: str) -> int:
    """The number an answer states, in digits or words."""
    m = re.search(r"\d+", text)
    if m:
        return int(m[0])
    words = {number_words(n): n for n in range(200)}
    found = [n for w, n in words.items() if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)]
    assert len(found) == 1, text
    return found[0]


def test_sft_answers_are_right_and_mix_digits_and_words():
    records = sft_records(400, seed=0)
    for r in records:
        assert r["response"].startswith(" ")
        assert _number_in(r["response"]) == answer_of(r["prompt"])[0], r
    scores = digit_fraction([r["prompt"] for r in records], [r["response"] for r in records])
    mean = sum(scores) / len(scores)
    # Partly in digits: PPO towards "answer in digits" has room to improve, and digits are not foreign.
    assert 0.15 < mean < 0.5, mean
    assert any(s == 1.0 for s in scores) and any(s == 0.0 for s in scores)


def test_preferences_favour_more_digits():
    records = preference_records(400, seed=0)
    for r in records:
        c, rej = digit_fraction([r["prompt"]] * 2, [r["chosen"], r["rejected"]])
        assert c > rej, r
        assert _number_in(r["chosen"]) == _number_in(r["rejected"]) == answer_of(r["prompt"])[0]


def test_cli_and_loaders_read_the_files(tmp_path, capsys):
    from rlhf_ray.supervised.config import PreferenceDataConfig, SFTDataConfig
    from rlhf_ray.supervised.data import load_preference_data, load_sft_data
    from rlhf_ray.tiny_models import build_tokenizer

    out = tmp_path / "demo"
    assert demo_data.main(["--out", str(out), "--sft", "20", "--pairs", "20", "--prompts", "8"]) == 0
    assert "sft.jsonl: 20 records" in capsys.readouterr().out
    tok = build_tokenizer(seed=0)
    sft = load_sft_data(SFTDataConfig(train_path=str(out / "sft.jsonl"), eval_fraction=0.1), tok, 0)
    pref = load_preference_data(PreferenceDataConfig(train_path=str(out / "preference.jsonl"), eval_fraction=0.1),
                                tok, 0)
    assert (len(sft.train), len(sft.eval), len(pref.train), len(pref.eval)) == (18, 2, 18, 2)
    assert sft.stats["train"].dropped == 0 and pref.stats["train"].truncated == 0


def test_ensure_demo_data_writes_only_when_missing(tmp_path):
    paths = demo_data.ensure_demo_data(str(tmp_path), seed=0)
    before = open(paths["sft.jsonl"]).read()
    with open(paths["sft.jsonl"], "a") as fh:
        fh.write('{"prompt": "x", "response": "y"}\n')
    demo_data.ensure_demo_data(str(tmp_path), seed=0)  # all present: left alone
    assert open(paths["sft.jsonl"]).read() != before
