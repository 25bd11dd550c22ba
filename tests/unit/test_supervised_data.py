"""SFT and preference data loading: JSONL/Parquet, field names, chat templates, the length
policy with its counts, and the errors for missing files and fields, empty files and long records."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from rlhf_ray.data.records import DataError, read_prompts, read_records
from rlhf_ray.data.rm_inputs import pair_ids
from rlhf_ray.supervised.config import PreferenceDataConfig, SFTDataConfig
from rlhf_ray.supervised.data import PairBatch, holdout_split, load_preference_data, load_sft_data

# A minimal chat template: "<|user|>text\n" per user turn, "<|assistant|>" opens the reply and
# "</s>" closes it (so the rendered response carries its own EOS).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% else %}<|assistant|>{{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    from rlhf_ray.tiny_models import build_tokenizer

    return build_tokenizer(seed=0)


@pytest.fixture()
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


@pytest.fixture()
def bos_tok(tok):
    """The tiny tokenizer adding BOS first, as Llama's does."""
    from tokenizers import processors

    t = copy.deepcopy(tok)
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                        special_tokens=[("<s>", t.bos_token_id)])
    return t


def write_jsonl(path, records) -> str:
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def write_parquet(path, records) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), str(path))
    return str(path)


SFT_RECORDS = [
    {"prompt": "Q: what is 2 plus 3? A:", "response": " 5"},
    {"prompt": "Write the number after 7:", "response": " It is eight."},
    {"prompt": "a dog sees 4 birds. How many?", "response": " 4 birds."},
]


def sft_cfg(path: str, **kw) -> SFTDataConfig:
    return dataclasses.replace(SFTDataConfig(train_path=path, eval_fraction=0.0), **kw)


# ---- reading files -----------------------------------------------------------------


def test_jsonl_and_parquet_give_the_same_records(tmp_path):
    a = read_records(write_jsonl(tmp_path / "a.jsonl", SFT_RECORDS))
    b = read_records(write_parquet(tmp_path / "a.parquet", SFT_RECORDS))
    assert a.to_list() == b.to_list() == SFT_RECORDS


def test_missing_file_names_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*--data.eval_path"):
        read_records(str(tmp_path / "nope.jsonl"), flag="--data.eval_path")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl_is_a_clear_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="holds no records"):
        read_records(str(path))


def test_empty_parquet_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), str(path))
    with pytest.raises(DataError, match="holds no records"):
        read_records(str(path))


def test_unknown_extension_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="--data.format"):
        read_records(write_jsonl(tmp_path / "a.txt", SFT_RECORDS))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    with pytest.raises(DataError, match="cannot read"):
        read_records(str(bad))
    assert len(read_records(write_jsonl(tmp_path / "a.txt", SFT_RECORDS), fmt="jsonl")) == 3


def test_missing_field_lists_columns_and_flag(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"no field 'prompt'.*question.*--data.prompt_field"):
        load_sft_data(sft_cfg(path), tok, 0)


def test_null_field_names_the_record(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [SFT_RECORDS[0], {"prompt": "p", "response": None}])
    with pytest.raises(DataError, match=r"record 1 has no value for field 'response'"):
        load_sft_data(sft_cfg(path), tok, 0)


def test_custom_field_names(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": r["prompt"], "answer": r["response"]} for r in SFT_RECORDS])
    data = load_sft_data(sft_cfg(path, prompt_field="question", response_field="answer"), tok, 0)
    assert len(data.train) == 3 and data.eval is None


# ---- SFT tokenisation ----------------------------------------------------------------


def test_sft_loss_mask_covers_response_and_eos_only(tmp_path, tok):
    data = load_sft_data(sft_cfg(write_jsonl(tmp_path / "a.jsonl", SFT_RECORDS)), tok, 0)
    batch = data.train
    assert batch.input_ids.shape[0] == 3 and batch.loss_mask.dtype == torch.bool
    for i, rec in enumerate(SFT_RECORDS):
        ids = batch.input_ids[i][batch.attention_mask[i]].tolist()
        mask = batch.loss_mask[i][batch.attention_mask[i]].tolist()
        n_prompt = len(tok(rec["prompt"])["input_ids"])
        assert ids[:n_prompt] == tok(rec["prompt"])["input_ids"]  # as PPO tokenises prompts
        assert mask == [False] * n_prompt + [True] * (len(ids) - n_prompt)
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[n_prompt:-1]) == rec["response"]
    # Padding is never a target; targets are counted from position 1 on.
    assert not (batch.loss_mask & ~batch.attention_mask).any()
    assert batch.num_target_tokens() == int(batch.loss_mask.sum())


def test_sft_without_eos(tmp_path, tok):
    data = load_sft_data(sft_cfg(write_jsonl(tmp_path / "a.jsonl", SFT_RECORDS), add_eos=False), tok, 0)
    assert tok.eos_token_id not in data.train.input_ids[data.train.attention_mask].tolist()


def _long_records():
    return SFT_RECORDS + [{"prompt": "Count:", "response": " " + " ".join(str(i) for i in range(40))}]


def test_too_long_truncate_counts_and_keeps_prompt(tmp_path, tok):
    data = load_sft_data(sft_cfg(write_jsonl(tmp_path / "a.jsonl", _long_records()), max_len=30), tok, 0)
    stats = data.stats["train"]
    assert (stats.records, stats.kept, stats.truncated, stats.dropped) == (4, 4, 1, 0)
    assert int(data.train.attention_mask.sum(1).max()) == 30
    row = data.train.input_ids[3][data.train.attention_mask[3]].tolist()
    n_prompt = len(tok("Count:")["input_ids"])
    assert row[:n_prompt] == tok("Count:")["input_ids"]  # the response's end is cut, not the prompt


def test_too_long_drop_counts(tmp_path, tok):
    data = load_sft_data(sft_cfg(write_jsonl(tmp_path / "a.jsonl", _long_records()), max_len=30, too_long="drop"),
                         tok, 0)
    assert (data.stats["train"].kept, data.stats["train"].dropped, data.stats["train"].truncated) == (3, 1, 0)
    assert len(data.train) == 3


def test_too_long_error_names_record_and_flags(tmp_path, tok):
    with pytest.raises(DataError, match=r"record 3 has \d+ tokens, more than --data.max_len 30.*--data.too_long"):
        load_sft_data(sft_cfg(write_jsonl(tmp_path / "a.jsonl", _long_records()), max_len=30, too_long="error"),
                      tok, 0)


def test_prompt_filling_max_len_is_dropped_even_when_truncating(tmp_path, tok):
    recs = [{"prompt": "Ann likes apples at home. " * 5, "response": " 3"}, SFT_RECORDS[0]]
    data = load_sft_data(sft_cfg(write_jsonl(tmp_path / "a.jsonl", recs), max_len=14), tok, 0)
    assert (data.stats["train"].kept, data.stats["train"].dropped) == (1, 1)


def test_everything_dropped_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match="no record .* is left"):
        load_sft_data(sft_cfg(write_jsonl(tmp_path / "a.jsonl", SFT_RECORDS), max_len=3, too_long="drop"), tok, 0)


def test_sft_batch_select_and_trim(tmp_path, tok):
    batch = load_sft_data(sft_cfg(write_jsonl(tmp_path / "a.jsonl", _long_records())), tok, 0).train
    short = batch.select([0]).trim()
    assert short.input_ids.shape == (1, int(batch.attention_mask[0].sum()))
    assert short.attention_mask.all()


# ---- chat template -----------------------------------------------------------------


def test_chat_messages_are_rendered_with_the_template(tmp_path, chat_tok):
    recs = [{"messages": [{"role": "user", "content": "what is 2 plus 3?"}, {"role": "assistant", "content": "5"}]}]
    data = load_sft_data(sft_cfg(write_jsonl(tmp_path / "c.jsonl", recs), template="chat"), chat_tok, 0)
    ids = data.train.input_ids[0][data.train.attention_mask[0]].tolist()
    mask = data.train.loss_mask[0][data.train.attention_mask[0]].tolist()
    assert chat_tok.decode(ids) == "<|user|>what is 2 plus 3?\n<|assistant|>5</s>"
    response = [t for t, m in zip(ids, mask) if m]
    assert chat_tok.decode(response) == "5</s>"  # the template's EOS; none appended twice
    assert response.count(chat_tok.eos_token_id) == 1


def test_chat_errors(tmp_path, tok, chat_tok):
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "5"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", recs)
    with pytest.raises(DataError, match="chat template"):
        load_sft_data(sft_cfg(path, template="chat"), tok, 0)  # this tokenizer has no template
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="end with an assistant message"):
        load_sft_data(sft_cfg(path, template="chat"), chat_tok, 0)
    path = write_jsonl(tmp_path / "e.jsonl", [{"messages": 5}])
    with pytest.raises(DataError, match="list of"):
        load_sft_data(sft_cfg(path, template="chat"), chat_tok, 0)


# ---- preference pairs --------------------------------------------------------------

PAIRS = [
    {"prompt": "Q: what is 2 plus 3? A:", "chosen": " 5", "rejected": " five", "m": 1.0},
    {"prompt": "Write the number after 7:", "chosen": " It is 8.", "rejected": " It is eight.", "m": 0.5},
    {"prompt": "a dog sees 4 birds. How many?", "chosen": " 4", "rejected": " four birds.", "m": 2.0},
]


def pref_cfg(path: str, **kw) -> PreferenceDataConfig:
    return dataclasses.replace(PreferenceDataConfig(train_path=path, eval_fraction=0.0), **kw)


def test_pairs_tokenise_by_the_reward_input_rule(tmp_path, tok):
    data = load_preference_data(pref_cfg(write_jsonl(tmp_path / "p.jsonl", PAIRS)), tok, 0)
    b = data.train
    eos = tok.eos_token_id
    for i, rec in enumerate(PAIRS):
        # The prompt with the tokenizer's special tokens, the response alone, then EOS: the ids the
        # PPO reward role reads for this prompt and a response that ended with EOS (rm_inputs.py).
        for side, ids, mask in (("chosen", b.chosen_ids, b.chosen_mask), ("rejected", b.rejected_ids, b.rejected_mask)):
            want = tok(rec["prompt"])["input_ids"] + tok(rec[side], add_special_tokens=False)["input_ids"] + [eos]
            assert ids[i][mask[i]].tolist() == want
            assert want == pair_ids(tok, rec["prompt"], rec[side], chat=False)[0]
    assert b.margin is None


def test_a_prompt_that_begins_with_bos_gets_no_second_one(tmp_path, bos_tok):
    """A pre-rendered prompt that starts with the BOS text keeps that one BOS (SFT, RM and PPO alike)."""
    recs = [{"prompt": "<s>Q: 2 plus 3? A:", "chosen": " 5", "rejected": " five"},
            {"prompt": "Q: 2 plus 3? A:", "chosen": " 5", "rejected": " five"}]
    b = load_preference_data(pref_cfg(write_jsonl(tmp_path / "p.jsonl", recs)), bos_tok, 0).train
    first, second = b.chosen_ids[0][b.chosen_mask[0]].tolist(), b.chosen_ids[1][b.chosen_mask[1]].tolist()
    assert first == second and first.count(bos_tok.bos_token_id) == 1 and first[0] == bos_tok.bos_token_id
    sft = load_sft_data(sft_cfg(write_jsonl(tmp_path / "s.jsonl", [{"prompt": r["prompt"], "response": r["chosen"]}
                                                                    for r in recs])), bos_tok, 0).train
    assert sft.input_ids[0].tolist() == sft.input_ids[1].tolist() == first


def test_a_chat_response_ends_at_its_first_eos(tmp_path, chat_tok):
    """A template that writes text after the closing EOS (e.g. a newline): the reward model is
    trained on the response up to its EOS, which is where generation stops in PPO."""
    t = copy.deepcopy(chat_tok)
    t.chat_template = CHAT_TEMPLATE.replace("</s>{% endif %}", "</s>\n{% endif %}")
    recs = [{"prompt": [{"role": "user", "content": "2 plus 3?"}], "chosen": "5", "rejected": "five"}]
    b = load_preference_data(pref_cfg(write_jsonl(tmp_path / "p.jsonl", recs), template="chat"), t, 0).train
    assert t.decode(b.chosen_ids[0][b.chosen_mask[0]]) == "<|user|>2 plus 3?\n<|assistant|>5</s>"


def test_pairs_from_parquet_with_custom_fields_and_margin(tmp_path, tok):
    recs = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "m": r["m"]} for r in PAIRS]
    cfg = pref_cfg(write_parquet(tmp_path / "p.parquet", recs), prompt_field="q", chosen_field="good",
                   rejected_field="bad", margin_field="m")
    data = load_preference_data(cfg, tok, 0)
    assert data.train.margin.tolist() == [1.0, 0.5, 2.0]


def test_pair_missing_field(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "worse": "b"}])
    with pytest.raises(DataError, match=r"no field 'rejected'.*--data.rejected_field"):
        load_preference_data(pref_cfg(path), tok, 0)


def test_pair_length_policy_counts_pairs(tmp_path, tok):
    long = {"prompt": "Count:", "chosen": " 1", "rejected": " " + " ".join(str(i) for i in range(40)), "m": 0.0}
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS + [long])
    trunc = load_preference_data(pref_cfg(path, max_len=30), tok, 0)
    assert (trunc.stats["train"].kept, trunc.stats["train"].truncated, trunc.stats["train"].dropped) == (4, 1, 0)
    assert trunc.train.rejected_mask.sum(1).max() == 30
    # The short side is untouched: prompt, response and EOS.
    assert trunc.train.chosen_mask[3].sum() == len(tok("Count:")["input_ids"] + tok(" 1")["input_ids"]) + 1
    drop = load_preference_data(pref_cfg(path, max_len=30, too_long="drop"), tok, 0)
    assert (drop.stats["train"].kept, drop.stats["train"].dropped) == (3, 1)  # the whole pair goes
    with pytest.raises(DataError, match=r"pair 3 \(rejected\)"):
        load_preference_data(pref_cfg(path, max_len=30, too_long="error"), tok, 0)


def test_chat_pairs(tmp_path, chat_tok):
    # Sides as plain replies after prompt messages...
    recs = [{"prompt": [{"role": "user", "content": "2 plus 3?"}], "chosen": "5", "rejected": "five"}]
    data = load_preference_data(pref_cfg(write_jsonl(tmp_path / "p.jsonl", recs), template="chat"), chat_tok, 0)
    b = data.train
    assert chat_tok.decode(b.chosen_ids[0][b.chosen_mask[0]]) == "<|user|>2 plus 3?\n<|assistant|>5</s>"
    assert chat_tok.decode(b.rejected_ids[0][b.rejected_mask[0]]) == "<|user|>2 plus 3?\n<|assistant|>five</s>"
    # ... or as whole conversations (no prompt field).
    recs = [{"chosen": [{"role": "user", "content": "1 plus 1?"}, {"role": "assistant", "content": "2"}],
             "rejected": [{"role": "user", "content": "1 plus 1?"}, {"role": "assistant", "content": "two"}]}]
    data = load_preference_data(pref_cfg(write_jsonl(tmp_path / "q.jsonl", recs), template="chat"), chat_tok, 0)
    b = data.train
    assert chat_tok.decode(b.rejected_ids[0][b.rejected_mask[0]]) == "<|user|>1 plus 1?\n<|assistant|>two</s>"
    # A plain reply needs prompt messages to answer.
    recs = [{"chosen": "2", "rejected": "two"}]
    with pytest.raises(DataError, match="no prompt field"):
        load_preference_data(pref_cfg(write_jsonl(tmp_path / "r.jsonl", recs), template="chat"), chat_tok, 0)


def test_pair_batch_stacked():
    b = PairBatch(torch.tensor([[5, 6, 7]]), torch.tensor([[True, True, True]]),
                  torch.tensor([[8]]), torch.tensor([[True]]))
    ids, mask = b.stacked(pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


# ---- splits and prompts --------------------------------------------------------------


def test_holdout_split_is_deterministic_and_disjoint():
    tr, ev = holdout_split(100, 0.1, seed=3)
    assert len(ev) == 10 and len(tr) == 90 and not set(tr) & set(ev)
    assert holdout_split(100, 0.1, seed=3) == (tr, ev)
    assert holdout_split(100, 0.1, seed=4) != (tr, ev)
    assert holdout_split(5, 0.01, seed=0)[1] != []  # at least one held out
    assert holdout_split(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(DataError, match="too few"):
        holdout_split(1, 0.5, seed=0)


def test_eval_fraction_and_eval_path(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", SFT_RECORDS * 4)
    data = load_sft_data(sft_cfg(path, eval_fraction=0.25), tok, 0)
    assert (len(data.train), len(data.eval)) == (9, 3)
    ev = write_jsonl(tmp_path / "ev.jsonl", SFT_RECORDS[:1])
    data = load_sft_data(sft_cfg(path, eval_path=ev, eval_fraction=0.25), tok, 0)
    assert (len(data.train), len(data.eval)) == (12, 1)


def test_read_prompts_jsonl_parquet_and_chat(tmp_path, chat_tok):
    recs = [{"text": "Q: what is 1 plus 1? A:"}, {"text": "Write the number after 3:"}]
    assert read_prompts(write_parquet(tmp_path / "p.parquet", recs), "text") == [r["text"] for r in recs]
    assert read_prompts(write_jsonl(tmp_path / "p.jsonl", recs), "text") == [r["text"] for r in recs]
    chat = read_prompts(write_jsonl(tmp_path / "c.jsonl", recs), "text", template="chat", tokenizer=chat_tok)
    assert chat[0] == "<|user|>Q: what is 1 plus 1? A:\n<|assistant|>"
