"""Prompt loading, tokenising with the length policy, and the resumable sampler."""

import json
import re

import pytest

from rlhf_ray.config import DataConfig
from rlhf_ray.data.prompts import (PromptSampler, PromptSet, builtin_prompts, keep_last_tokens, load_prompt_texts,
                                  load_prompts, pad_token_id, split_holdout, tokenize_prompts)
from rlhf_ray.data.records import DataError, iter_rows


class WordTokenizer:
    """Stand-in for a HF tokenizer: one token per word (id = 3 + word length), BOS id 1 first.

    Records every call so tests can check what was asked of it."""

    def __init__(self, bos: int | None = 1) -> None:
        self.bos = bos
        self.bos_token_id = bos
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        self.calls.append((text, add_special_tokens))
        ids = [self.bos] if (add_special_tokens and self.bos is not None) else []
        return {"input_ids": ids + [3 + len(w) for w in text.split()]}


def _jsonl(tmp_path, lines: list[str], name: str = "prompts.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ---- builtin prompts ------------------------------------------------------------------


def test_builtin_digits_hand_values():
    assert builtin_prompts("digits", 3, seed=0) == [
        "the cat finds 49 coins. How many?",
        "the robot finds 26 coins. How many?",
        "Q: what is 33 plus 9? A:",
    ]


def test_builtin_prompts_are_deterministic_per_seed():
    assert builtin_prompts("digits", 50, seed=3) == builtin_prompts("digits", 50, seed=3)
    assert builtin_prompts("digits", 50, seed=3) != builtin_prompts("digits", 50, seed=4)
    # A longer set starts with the shorter one (same random stream).
    assert builtin_prompts("digits", 80, seed=3)[:50] == builtin_prompts("digits", 50, seed=3)


def test_builtin_prompts_follow_the_three_templates():
    templates = [
        r"Q: what is \d+ plus \d+\? A:",
        r"[a-z ]+ [a-z]+ \d+ [a-z]+\. How many\?",
        r"Write the number after \d+:",
    ]
    prompts = builtin_prompts("digits", 200, seed=0)
    assert len(prompts) == 200
    kinds = [next(i for i, t in enumerate(templates) if re.fullmatch(t, p)) for p in prompts]
    assert set(kinds) == {0, 1, 2}


def test_unknown_builtin_set_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown builtin prompt set 'poems'; available: builtin:digits"):
        builtin_prompts("poems", 3, seed=0)
    with pytest.raises(ValueError, match="available: builtin:digits"):
        load_prompt_texts(DataConfig(prompts="builtin:poems"), seed=0)


def test_load_builtin_through_the_config():
    cfg = DataConfig(prompts="builtin:digits", num_builtin_prompts=7)
    assert load_prompt_texts(cfg, seed=5) == builtin_prompts("digits", 7, seed=5)


def test_zero_builtin_prompts_is_an_error():
    with pytest.raises(ValueError, match="prompt source 'builtin:digits' holds no prompts"):
        load_prompt_texts(DataConfig(num_builtin_prompts=0), seed=0)


# ---- JSONL ------------------------------------------------------------------------


def test_jsonl_prompts_in_file_order(tmp_path):
    path = _jsonl(tmp_path, [
        '{"prompt": "first", "id": 1}',
        "",  # blank lines are skipped
        '{"prompt": "second", "extra": [1, 2]}',
        "   ",
        '{"prompt": 42}',  # non-string values become text
    ])
    assert load_prompt_texts(DataConfig(prompts=path), seed=0) == ["first", "second", "42"]


def test_blank_lines_are_counted_not_dropped_unseen(tmp_path):
    path = _jsonl(tmp_path, ['{"prompt": "a bb"}', "", '{"prompt": "ccc"}', "  \t", "", '{"prompt": "d"}'])
    out = load_prompts(DataConfig(prompts=path), WordTokenizer(), seed=0)
    assert out.texts == ["a bb", "ccc", "d"]
    assert (out.blank, out.dropped, out.truncated) == (3, 0, 0)
    assert out.describe() == "3 prompts (3 blank lines skipped, 0 dropped as too long or empty, 0 truncated)"
    train, held = split_holdout(out, 1, seed=0)
    assert (train.blank, held.blank) == (3, 0)  # the file's counts stay with the training set
    lines: list[int] = []
    assert [r for _, r in iter_rows(path, "jsonl", lines)] == [{"prompt": "a bb"}, {"prompt": "ccc"}, {"prompt": "d"}]
    assert lines == [2, 4, 5]


def test_a_file_of_blank_lines_says_so(tmp_path):
    path = _jsonl(tmp_path, ["", " "])
    with pytest.raises(ValueError, match=r"holds no prompts \(only 2 blank lines\)"):
        load_prompts(DataConfig(prompts=path), WordTokenizer(), seed=0)


def test_preflight_prints_the_blank_line_count(tmp_path, capsys):
    from rlhf_ray.config import load_config
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.tiny_models import build_tiny_model

    model = str(build_tiny_model(tmp_path / "m", arch="llama", seed=0))
    path = _jsonl(tmp_path, [json.dumps({"prompt": f"Write the number after {i}:"}) for i in range(8)] + ["", ""])
    inputs = prepare_inputs(load_config(None, {"model.path": model, "data.prompts": path, "eval.every": 0}))
    assert inputs.prompts.blank == 2
    assert f"prompts from {path}: 8 prompts (2 blank lines skipped, 0 dropped" in capsys.readouterr().out


def test_jsonl_custom_field(tmp_path):
    path = _jsonl(tmp_path, ['{"question": "a?", "prompt": "not this"}', '{"question": "b?"}'])
    assert load_prompt_texts(DataConfig(prompts=path, prompt_field="question"), seed=0) == ["a?", "b?"]


def test_jsonl_ignores_the_seed(tmp_path):
    path = _jsonl(tmp_path, ['{"prompt": "x"}', '{"prompt": "y"}'])
    assert load_prompt_texts(DataConfig(prompts=path), seed=0) == load_prompt_texts(DataConfig(prompts=path), seed=9)


def test_missing_file_names_the_flag(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError) as err:
        load_prompt_texts(DataConfig(prompts=missing), seed=0)
    assert f"prompt file {missing!r} does not exist; set --data.prompts to a JSONL file or builtin:digits." \
        == str(err.value)


def test_directory_is_not_a_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="set --data.prompts"):
        load_prompt_texts(DataConfig(prompts=str(tmp_path)), seed=0)


def test_invalid_json_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path, ['{"prompt": "ok"}', '{"prompt": "broken"', '{"prompt": "never read"}'])
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}:2:20 is not valid JSON \(") as err:
        load_prompt_texts(DataConfig(prompts=path), seed=0)
    assert "line 1" not in str(err.value)  # one position, the file's: not also the decoder's own line count


@pytest.mark.parametrize("record", ['{"text": "no prompt field"}', '["a", "list"]', '"just a string"'])
def test_missing_field_names_line_and_the_flag_to_fix_it(tmp_path, record):
    path = _jsonl(tmp_path, ['{"prompt": "ok"}', "", record])
    with pytest.raises(ValueError) as err:
        load_prompt_texts(DataConfig(prompts=path), seed=0)
    assert str(err.value) == (f"{path}:3 has no field 'prompt'; set --data.prompt_field "
                              "to the field that holds the prompt.")


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_empty_file_is_an_error(tmp_path, lines):
    path = _jsonl(tmp_path, lines)
    with pytest.raises(ValueError, match=rf"prompt source {re.escape(repr(path))} holds no prompts"):
        load_prompt_texts(DataConfig(prompts=path), seed=0)


def test_empty_file_error_names_the_fix(tmp_path):
    path = _jsonl(tmp_path, [])
    with pytest.raises(ValueError, match="--data.prompts"):
        load_prompt_texts(DataConfig(prompts=path), seed=0)


def test_null_prompt_is_an_error(tmp_path):
    path = _jsonl(tmp_path, ['{"prompt": "ok"}', '{"prompt": null}'])
    with pytest.raises(ValueError, match=":2"):
        load_prompt_texts(DataConfig(prompts=path), seed=0)


# ---- Parquet (the same record reader as the supervised stages) ---------------------------


def _parquet(tmp_path, records: list[dict], name: str = "prompts.parquet") -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / name)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_parquet_prompts_equal_the_jsonl_ones(tmp_path):
    records = [{"prompt": "first", "id": 1}, {"prompt": "second", "id": 2}, {"prompt": "third", "id": 3}]
    jsonl = _jsonl(tmp_path, [json.dumps(r) for r in records])
    for ext in ("parquet", "pq"):
        path = _parquet(tmp_path, records, f"prompts.{ext}")
        assert load_prompt_texts(DataConfig(prompts=path), seed=0) == ["first", "second", "third"]
        assert load_prompt_texts(DataConfig(prompts=path), seed=0) == load_prompt_texts(DataConfig(prompts=jsonl),
                                                                                          seed=0)


def test_parquet_custom_field_and_numbers_as_text(tmp_path):
    path = _parquet(tmp_path, [{"question": 7, "prompt": "not this"}, {"question": 12, "prompt": "nor this"}])
    assert load_prompt_texts(DataConfig(prompts=path, prompt_field="question"), seed=0) == ["7", "12"]


def test_parquet_missing_column_names_the_record_and_the_flag(tmp_path):
    path = _parquet(tmp_path, [{"text": "a?"}, {"text": "b?"}])
    with pytest.raises(DataError) as err:
        load_prompt_texts(DataConfig(prompts=path), seed=0)
    assert str(err.value) == (f"{path} record 0 has no field 'prompt'; set --data.prompt_field "
                              "to the field that holds the prompt.")


def test_parquet_null_prompt_names_the_record(tmp_path):
    path = _parquet(tmp_path, [{"prompt": "ok"}, {"prompt": None}])
    with pytest.raises(ValueError) as err:
        load_prompt_texts(DataConfig(prompts=path), seed=0)
    assert str(err.value) == f"{path} record 1: field 'prompt' is null, not text; fix or remove the record."


def test_parquet_list_prompt_is_not_text(tmp_path):
    path = _parquet(tmp_path, [{"prompt": ["a", "b"]}])
    with pytest.raises(ValueError) as err:
        load_prompt_texts(DataConfig(prompts=path), seed=0)
    assert str(err.value) == f'{path} record 0: field \'prompt\' is ["a", "b"], not text; fix or remove the record.'


def test_parquet_without_rows_is_an_empty_prompt_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "empty.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], type=pa.string())}), path)
    with pytest.raises(ValueError, match=rf"prompt source {re.escape(repr(path))} holds no prompts"):
        load_prompt_texts(DataConfig(prompts=path), seed=0)


def test_unreadable_parquet_names_the_file(tmp_path):
    path = str(tmp_path / "broken.parquet")
    with open(path, "w") as fh:
        fh.write('{"prompt": "this is JSONL, not Parquet"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(repr(path))} is not a readable Parquet file"):
        load_prompt_texts(DataConfig(prompts=path), seed=0)


def test_other_extensions_are_still_read_as_jsonl(tmp_path):
    path = _jsonl(tmp_path, ['{"prompt": "a"}', '{"prompt": "b"}'], name="prompts.txt")
    assert load_prompt_texts(DataConfig(prompts=path), seed=0) == ["a", "b"]


# ---- pad_token_id -------------------------------------------------------------------------


@pytest.mark.parametrize(("pad", "eos", "want"), [(0, 2, 0), (None, 2, 2), (5, None, 5)])
def test_pad_token_id_is_the_pad_token_else_eos(pad, eos, want):
    from types import SimpleNamespace

    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == want


def test_pad_token_id_needs_a_pad_or_eos_token():
    from types import SimpleNamespace

    with pytest.raises(DataError, match="neither a pad nor an EOS token; set pad_token"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


# ---- tokenize_prompts -------------------------------------------------------------------

# With BOS these are 3, 6 and 2 tokens long.
TEXTS = ["a bb", "a bb ccc dddd eeeee", "z"]


def test_drop_policy_counts_drops():
    tok = WordTokenizer()
    out = tokenize_prompts(TEXTS, tok, max_tokens=3, too_long="drop")
    assert out == PromptSet(texts=["a bb", "z"], token_ids=[[1, 4, 5], [1, 4]], dropped=1, truncated=0)
    assert tok.calls == [(t, True) for t in TEXTS]  # special tokens (BOS) are added


def test_truncate_policy_keeps_the_bos_and_the_last_tokens():
    out = tokenize_prompts(TEXTS, WordTokenizer(), max_tokens=3, too_long="truncate")
    assert out.token_ids == [[1, 4, 5], [1, 7, 8], [1, 4]]  # BOS, then "dddd eeeee": the start is cut
    assert out.texts == TEXTS
    assert (out.dropped, out.truncated) == (0, 1)


def test_truncate_without_a_bos_keeps_the_last_tokens():
    out = tokenize_prompts(TEXTS, WordTokenizer(bos=None), max_tokens=3, too_long="truncate")
    assert out.token_ids == [[4, 5], [6, 7, 8], [4]]
    assert out.truncated == 1


@pytest.mark.parametrize("ids,max_tokens,want", [
    ([1, 4, 5, 6, 7], 3, [1, 6, 7]),
    ([1, 4, 5, 6, 7], 2, [1, 7]),
    ([1, 4, 5, 6, 7], 1, [7]),  # no room for a token after BOS: the last token alone
    ([4, 5, 1, 6, 7], 3, [1, 6, 7]),  # a BOS that is not first is an ordinary token
    ([4, 5, 6], 3, [4, 5, 6]),
])
def test_keep_last_tokens_hand_values(ids, max_tokens, want):
    assert keep_last_tokens(ids, max_tokens, bos_id=1) == want


def test_error_policy_names_the_prompt_and_the_flags():
    with pytest.raises(ValueError) as err:
        tokenize_prompts(TEXTS, WordTokenizer(), max_tokens=3, too_long="error")
    assert str(err.value) == ("prompt 1 has 6 tokens, more than --data.max_prompt_tokens 3; raise the limit or "
                              "set --data.too_long drop/truncate.")


@pytest.mark.parametrize("policy", ["drop", "truncate", "error"])
def test_prompt_of_exactly_max_tokens_is_kept(policy):
    out = tokenize_prompts(["a bb ccc"], WordTokenizer(), max_tokens=4, too_long=policy)
    assert out.token_ids == [[1, 4, 5, 6]]
    assert (out.dropped, out.truncated) == (0, 0)


def test_empty_token_lists_are_dropped_and_counted():
    out = tokenize_prompts(["", "a", "  "], WordTokenizer(bos=None), max_tokens=3, too_long="error")
    assert out.token_ids == [[4]] and out.texts == ["a"]
    assert out.dropped == 2


def test_all_dropped_is_an_error_naming_the_fix():
    with pytest.raises(ValueError) as err:
        tokenize_prompts(["a bb ccc", "dddd eeeee ffffff"], WordTokenizer(), max_tokens=2, too_long="drop")
    assert str(err.value) == ("all 2 prompts were dropped as longer than --data.max_prompt_tokens 2; raise the "
                              "limit or set --data.too_long truncate.")


def test_tokenize_accepts_a_tuple_of_ids_and_returns_lists():
    out = tokenize_prompts(["x"], lambda text, add_special_tokens: {"input_ids": (7, 8)}, 4, "drop")
    assert out.token_ids == [[7, 8]]
    assert isinstance(out.token_ids[0], list)


# ---- data.template and BOS (the rule of rlhf_ray/data/rm_inputs.py) ------------------------

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def bos_tok():
    """The tiny byte-level tokenizer adding BOS first (as Llama's does), with a chat template
    that writes BOS itself."""
    from tokenizers import processors

    from rlhf_ray.tiny_models import build_tokenizer

    t = build_tokenizer(seed=0)
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                        special_tokens=[("<s>", t.bos_token_id)])
    t.chat_template = CHAT_TEMPLATE
    return t


def test_chat_template_prompts_get_one_bos(tmp_path, bos_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    path = _jsonl(tmp_path, [json.dumps({"prompt": "what is 2 plus 3?"}), json.dumps({"prompt": messages})])
    out = load_prompts(DataConfig(prompts=path, template="chat"), bos_tok, seed=0)
    assert out.texts == ["<s><|user|>what is 2 plus 3?\n<|assistant|>",
                         "<s><|system|>Be brief.\n<|user|>hi\n<|assistant|>"]
    for text, ids in zip(out.texts, out.token_ids):
        assert ids == bos_tok(text, add_special_tokens=False)["input_ids"]
        assert ids.count(bos_tok.bos_token_id) == 1 and ids[0] == bos_tok.bos_token_id
    # Before data.template, such a rendering got the tokenizer's BOS on top of the template's.
    assert bos_tok(out.texts[0])["input_ids"][:2] == [bos_tok.bos_token_id] * 2


def test_plain_prompts_get_the_tokenizers_bos_once(tmp_path, bos_tok):
    path = _jsonl(tmp_path, ['{"prompt": "what is 2 plus 3?"}', '{"prompt": "<s>what is 2 plus 3?"}'])
    out = load_prompts(DataConfig(prompts=path), bos_tok, seed=0)
    assert out.token_ids[0] == out.token_ids[1] == bos_tok("what is 2 plus 3?")["input_ids"]
    assert out.token_ids[0].count(bos_tok.bos_token_id) == 1


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_a_truncated_prompt_keeps_its_one_bos(tmp_path, bos_tok, template):
    """Cut from the left to --data.max_prompt_tokens, a prompt still begins with the BOS the
    tokenizer (plain) or the template (chat) put there, then the prompt's last tokens."""
    text = "the cat finds 49 coins and the robot finds 26 coins. How many coins are there?"
    path = _jsonl(tmp_path, [json.dumps({"prompt": text})])
    full = load_prompts(DataConfig(prompts=path, template=template, max_prompt_tokens=512), bos_tok, seed=0)
    ids = full.token_ids[0]
    assert ids[0] == bos_tok.bos_token_id and len(ids) > 12
    out = load_prompts(DataConfig(prompts=path, template=template, max_prompt_tokens=8, too_long="truncate"),
                       bos_tok, seed=0)
    assert out.truncated == 1
    assert out.token_ids[0] == [bos_tok.bos_token_id] + ids[-7:]


def test_builtin_prompts_as_chat(bos_tok):
    cfg = DataConfig(num_builtin_prompts=3, template="chat")
    assert load_prompt_texts(cfg, seed=0, tokenizer=bos_tok) == [
        f"<s><|user|>{t}\n<|assistant|>" for t in builtin_prompts("digits", 3, seed=0)]


def test_chat_template_needs_a_tokenizer_with_one(tmp_path):
    path = _jsonl(tmp_path, ['{"prompt": "hi"}'])
    with pytest.raises(DataError, match="--data.template chat needs a tokenizer with a chat template"):
        load_prompts(DataConfig(prompts=path, template="chat"), WordTokenizer(), seed=0)


# ---- PromptSampler ---------------------------------------------------------------------


def test_sampler_hand_values():
    s = PromptSampler(5, seed=0)
    assert s.next(3) == [2, 1, 0]
    assert s.next(3) == [4, 3, 2]  # 2 left in epoch 0, then the first of epoch 1
    assert s.state_dict() == {"epoch": 1, "position": 1, "size": 5, "seed": 0}


def test_sampler_without_shuffle_cycles_in_order():
    s = PromptSampler(5, seed=0, shuffle=False)
    assert s.next(7) == [0, 1, 2, 3, 4, 0, 1]
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["position"] == 2


def test_sampler_is_deterministic_per_seed():
    draws = [PromptSampler(10, seed=7).next(25) for _ in range(2)]
    assert draws[0] == draws[1]
    assert PromptSampler(10, seed=8).next(25) != draws[0]


def test_each_epoch_is_a_fresh_permutation():
    s = PromptSampler(10, seed=0)
    epochs = [s.next(10) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(10))
    assert epochs[0] != epochs[1] != epochs[2]
    # One call spanning epochs gives the same indices as separate calls.
    assert PromptSampler(10, seed=0).next(30) == epochs[0] + epochs[1] + epochs[2]


def test_epoch_rolls_over_lazily():
    s = PromptSampler(4, seed=1)
    s.next(4)
    assert s.state_dict()["epoch"] == 0 and s.state_dict()["position"] == 4
    s.next(1)
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["position"] == 1


def test_next_zero_is_empty():
    s = PromptSampler(4, seed=1)
    assert s.next(0) == []
    assert s.state_dict()["position"] == 0


@pytest.mark.parametrize("consumed", [[3, 4], [5], [2, 3], [12]])
def test_resume_gives_the_same_next_batch(consumed):
    uninterrupted = PromptSampler(5, seed=11)
    for k in consumed:
        uninterrupted.next(k)
    interrupted = PromptSampler(5, seed=11)
    for k in consumed:
        interrupted.next(k)
    state = json.loads(json.dumps(interrupted.state_dict()))  # as if written to a checkpoint
    resumed = PromptSampler(5, seed=11)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == interrupted.state_dict()
    assert [resumed.next(3) for _ in range(4)] == [uninterrupted.next(3) for _ in range(4)]


def test_loading_a_checkpoint_of_another_size_raises():
    state = PromptSampler(5, seed=0).state_dict()
    with pytest.raises(ValueError) as err:
        PromptSampler(6, seed=0).load_state_dict(state)
    assert str(err.value) == "checkpoint's prompt set had 5 prompts, this one has 6; resume with the same data."


def test_empty_sampler_is_rejected():
    with pytest.raises(ValueError):
        PromptSampler(0, seed=0)


# ---- held-out evaluation prompts ---------------------------------------------------------


def _numbered(n: int, dropped: int = 0) -> PromptSet:
    return PromptSet([f"p{i}" for i in range(n)], [[100 + i] for i in range(n)], dropped, 0)


def test_split_holdout_is_a_disjoint_partition_in_original_order():
    train, held = split_holdout(_numbered(20, dropped=3), 5, seed=0)
    assert len(train.texts) == 15 and len(held.texts) == 5
    assert sorted(train.texts + held.texts, key=lambda t: int(t[1:])) == [f"p{i}" for i in range(20)]
    assert not set(train.texts) & set(held.texts)
    for part in (train, held):  # texts and token ids stay paired, in the original order
        assert [int(t[1:]) for t in part.texts] == [ids[0] - 100 for ids in part.token_ids]
        assert [int(t[1:]) for t in part.texts] == sorted(int(t[1:]) for t in part.texts)
    assert train.dropped == 3  # the tokenisation counts stay with the training set


def test_split_holdout_depends_only_on_the_seed():
    assert split_holdout(_numbered(50), 8, seed=1)[1].texts == split_holdout(_numbered(50), 8, seed=1)[1].texts
    assert split_holdout(_numbered(50), 8, seed=1)[1].texts != split_holdout(_numbered(50), 8, seed=2)[1].texts


@pytest.mark.parametrize("k", [0, 10, 11])
def test_split_holdout_must_leave_both_sides_non_empty(k):
    with pytest.raises(ValueError, match=r"cannot hold out .* of 10 prompts.*--eval.holdout between 1 and 9"):
        split_holdout(_numbered(10), k, seed=0)
