"""The rule by which a (prompt, response) pair becomes reward-model input ids (rlhf_ray/data/rm_inputs.py)."""

from __future__ import annotations

import copy

import pytest

from rlhf_ray.data.rm_inputs import (adds_special_tokens, decode_pair, encode_prompts, encode_responses, end_response,
                                     pair_ids, prompt_ids, same_tokenizer)

EOS = 2


@pytest.fixture(scope="module")
def tok():
    from rlhf_ray.tiny_models import build_tokenizer

    return build_tokenizer(seed=0)


@pytest.fixture(scope="module")
def bos_tok(tok):
    """The tiny tokenizer adding BOS first, as Llama's does."""
    from tokenizers import processors

    t = copy.deepcopy(tok)
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                        special_tokens=[("<s>", t.bos_token_id)])
    return t


@pytest.mark.parametrize("ids,finished,want", [
    ([5, 6], True, [5, 6, EOS]),  # finished: EOS appended
    ([5, 6, EOS], True, [5, 6, EOS]),  # not twice
    ([5, EOS, 7, EOS], True, [5, EOS]),  # generation stops at the first EOS
    ([5, 6], False, [5, 6]),  # cut off: as it is
    ([5, 6, EOS], False, [5, 6, EOS]),
    ([], True, [EOS]),
])
def test_end_response_hand_values(ids, finished, want):
    assert end_response(ids, EOS, finished) == want


def test_end_response_without_an_eos_token():
    assert end_response([5, 6], None, True) == [5, 6]


def test_special_tokens_only_for_plain_prompts_without_bos(bos_tok):
    assert adds_special_tokens(bos_tok, "Q: 1?", chat=False)
    assert not adds_special_tokens(bos_tok, "<s>Q: 1?", chat=False)
    assert not adds_special_tokens(bos_tok, "Q: 1?", chat=True)
    assert adds_special_tokens(object(), "<s>Q: 1?", chat=False)  # no BOS token known: the tokenizer decides


def test_prompt_ids_have_one_bos(bos_tok):
    plain = prompt_ids(bos_tok, "Q: 1?", chat=False)
    assert plain[0] == bos_tok.bos_token_id and plain.count(bos_tok.bos_token_id) == 1
    assert prompt_ids(bos_tok, "<s>Q: 1?", chat=False) == plain  # not [BOS, BOS, ...]
    assert prompt_ids(bos_tok, "<s>Q: 1?", chat=True) == plain  # a template that wrote BOS
    assert prompt_ids(bos_tok, "Q: 1?", chat=True) == plain[1:]  # a template that wrote none


def test_batched_prompts_equal_one_by_one(bos_tok):
    texts = ["Q: 1?", "<s>Q: 2?", "", "a longer prompt, with 3 numbers: 4 5"]
    for chat in (False, True):
        assert encode_prompts(bos_tok, texts, chat) == [prompt_ids(bos_tok, t, chat) for t in texts]


def test_responses_take_no_special_tokens(bos_tok):
    assert encode_responses(bos_tok, [" 5", " 5</s>", " 5</s>\n"]) == [bos_tok(" 5", add_special_tokens=False)[
        "input_ids"] + [EOS]] * 3
    assert encode_responses(bos_tok, [" 5"], finished=False) == [bos_tok(" 5", add_special_tokens=False)["input_ids"]]
    assert encode_responses(bos_tok, []) == []


def test_pair_ids_are_prompt_then_response(bos_tok):
    ids, n = pair_ids(bos_tok, "Q: 1?", " 2", chat=False)
    prompt = prompt_ids(bos_tok, "Q: 1?", chat=False)
    assert n == len(prompt)
    assert ids == prompt + bos_tok(" 2", add_special_tokens=False)["input_ids"] + [EOS]


def test_decode_pair_inverts_pair_ids(tok, bos_tok):
    for t in (tok, bos_tok):
        for finished in (True, False):
            ids, n = pair_ids(t, "<|user|>Q: 1?\n<|assistant|>", " 2 apples", chat=False, finished=finished)
            assert decode_pair(t, ids[:n], ids[n:]) == ("<|user|>Q: 1?\n<|assistant|>", " 2 apples", finished)
    # Special tokens other than the leading BOS and the final EOS stay in the text.
    assert decode_pair(bos_tok, [1, *bos_tok("a</s>b", add_special_tokens=False)["input_ids"]], [EOS, EOS]) == \
        ("a</s>b", "</s>", True)


def test_same_tokenizer(tok, bos_tok):
    from rlhf_ray.tiny_models import build_tokenizer

    assert same_tokenizer(tok, copy.deepcopy(tok))
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None  # a trainer's saved copy may set pad = EOS; ids do not depend on it
    assert same_tokenizer(tok, no_pad)
    assert not same_tokenizer(tok, bos_tok)  # adds BOS: other ids for the same text
    assert not same_tokenizer(tok, build_tokenizer(seed=0, vocab_size=400))  # another vocabulary
