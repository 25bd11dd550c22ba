"""Typed batches: packing a Generation by hand, and the row/column transforms.

The hand example has B=3 samples, P=3 prompt tokens and R=4 response tokens (B != R),
pad id 0 and EOS id 2.
"""

import pytest
import torch

from rlhf_ray.batch import (ExperienceBatch, Generation, TrainUpdate, pack_generation, pack_rows, parts_for_budget,
                            plan_passes, token_balanced_parts)

PAD, EOS = 0, 2


def _generation() -> Generation:
    return Generation(
        prompt_ids=[[5, 6, 7], [8], [9, 10]],
        response_ids=[[11, 12, EOS], [13, 14, 15, 16], [17, EOS]],
        logprobs=[[-0.1, -0.2, -0.3], [-1.0, -1.5, -2.0, -2.5], [-0.5, -0.25]],
        # sample 1 hit the limit without EOS; sample 2 hit it exactly with EOS
        finish_reasons=["stop", "length", "length"],
        prompt_index=[0, 1, 1],
    )


def _packed() -> ExperienceBatch:
    return pack_generation(_generation(), PAD, [EOS])


def _filled(batch: ExperienceBatch) -> ExperienceBatch:
    """The batch with every optional field set to distinct values."""
    B, R = batch.response_mask.shape
    grid = torch.arange(B * R, dtype=torch.float32).reshape(B, R)
    return batch.replace(
        ref_logprobs=-grid, scores=torch.tensor([1.0, 2.0, 3.0]), old_logprobs=-grid - 0.5,
        old_values=grid / 10, advantages=grid + 100, returns=grid + 200, bad_rows=torch.tensor([False, True, False]),
    )


def _assert_same(a: ExperienceBatch, b: ExperienceBatch) -> None:
    assert a._tensor_fields() == b._tensor_fields()
    for name in a._tensor_fields():
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name


# ---- pack_generation -----------------------------------------------------------


def test_pack_hand_example():
    b = _packed()
    assert b.input_ids.tolist() == [
        [5, 6, 7, 11, 12, EOS, PAD],
        [PAD, PAD, 8, 13, 14, 15, 16],
        [PAD, 9, 10, 17, EOS, PAD, PAD],
    ]
    assert b.attention_mask.tolist() == [
        [True, True, True, True, True, True, False],
        [False, False, True, True, True, True, True],
        [False, True, True, True, True, False, False],
    ]
    # Real tokens count 0, 1, 2, ...; padding never advances the position.
    assert b.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5, 5],
        [0, 0, 0, 1, 2, 3, 4],
        [0, 0, 1, 2, 3, 3, 3],
    ]
    assert b.response_mask.tolist() == [
        [True, True, True, False],
        [True, True, True, True],
        [True, True, False, False],
    ]
    torch.testing.assert_close(b.rollout_logprobs, torch.tensor([
        [-0.1, -0.2, -0.3, 0.0],
        [-1.0, -1.5, -2.0, -2.5],
        [-0.5, -0.25, 0.0, 0.0],
    ]))
    assert b.truncated.tolist() == [False, True, False]
    assert b.prompt_index.tolist() == [0, 1, 1]


def test_pack_dtypes_shapes_and_helpers():
    b = _packed()
    assert (b.input_ids.dtype, b.attention_mask.dtype, b.position_ids.dtype) == (torch.long, torch.bool, torch.long)
    assert (b.response_mask.dtype, b.rollout_logprobs.dtype) == (torch.bool, torch.float32)
    assert (b.truncated.dtype, b.prompt_index.dtype) == (torch.bool, torch.long)
    assert b.input_ids.shape == (3, 7) and b.response_mask.shape == (3, 4)
    assert len(b) == 3 and b.prompt_len == 3
    assert b.response_ids.tolist() == [[11, 12, EOS, PAD], [13, 14, 15, 16], [17, EOS, PAD, PAD]]
    assert b.num_response_tokens() == 9
    assert b.ref_logprobs is None and b.advantages is None and b.bad_rows is None


@pytest.mark.parametrize(
    "response, reason, eos_ids, truncated",
    [
        ([3, 4], "length", [EOS], True),  # cut off mid-sentence
        ([3, EOS], "length", [EOS], False),  # ended exactly at the limit
        ([3, 9], "length", [EOS, 9], False),  # an extra stop token counts as an end
        ([3, 4], "stop", [EOS], False),  # stopped (e.g. a stop string): complete
        ([3, EOS], "length", [], True),  # no EOS ids given: "length" alone decides
        ([], "length", [EOS], True),
    ],
)
def test_truncated_only_when_length_and_no_eos_at_the_end(response, reason, eos_ids, truncated):
    gen = Generation([[5]], [response], [[-1.0] * len(response)], [reason], [0])
    assert pack_generation(gen, PAD, eos_ids).truncated.tolist() == [truncated]


def test_all_empty_responses_keep_one_masked_column():
    gen = Generation([[5, 6], [7]], [[], []], [[], []], ["stop", "stop"], [0, 1])
    b = pack_generation(gen, PAD, [EOS])
    assert b.response_mask.shape == (2, 1)
    assert not b.response_mask.any()
    assert b.input_ids.tolist() == [[5, 6, PAD], [PAD, 7, PAD]]
    assert b.num_response_tokens() == 0


def test_pad_id_fills_padding():
    b = pack_generation(_generation(), 99, [EOS])
    assert b.input_ids[1, :2].tolist() == [99, 99]
    assert b.input_ids[2, -2:].tolist() == [99, 99]
    assert torch.equal(b.attention_mask, _packed().attention_mask)


def test_pack_does_not_modify_the_generation():
    gen = _generation()
    before = [list(map(list, gen.prompt_ids)), list(map(list, gen.response_ids))]
    pack_generation(gen, PAD, [EOS])
    assert [gen.prompt_ids, gen.response_ids] == before


def test_empty_generation_raises():
    with pytest.raises(ValueError, match="cannot pack an empty generation"):
        pack_generation(Generation([], [], [], [], []), PAD, [EOS])


def test_mismatched_logprob_length_names_the_sample():
    gen = _generation()
    gen.logprobs[1] = [-1.0, -1.5, -2.0]
    with pytest.raises(ValueError, match="sample 1: 4 response tokens but 3 logprobs"):
        pack_generation(gen, PAD, [EOS])


def test_ragged_generation_is_rejected():
    gen = _generation()
    gen.prompt_ids.pop()
    gen.prompt_index.pop()
    with pytest.raises(ValueError):
        pack_generation(gen, PAD, [EOS])


def test_generation_concat_keeps_order():
    a, b = _generation(), _generation()
    b.prompt_index = [2, 2, 3]
    out = Generation.concat([a, b])
    assert len(out) == 6
    assert out.prompt_index == [0, 1, 1, 2, 2, 3]
    assert out.response_ids == a.response_ids + b.response_ids
    assert out.finish_reasons == ["stop", "length", "length"] * 2
    assert len(a) == 3  # inputs untouched


# ---- transforms -----------------------------------------------------------------


def test_select_rows_by_index_tensor():
    b = _filled(_packed())
    out = b.select(torch.tensor([2, 0]))
    assert len(out) == 2
    assert out.input_ids.tolist() == [b.input_ids[2].tolist(), b.input_ids[0].tolist()]
    assert out.scores.tolist() == [3.0, 1.0]
    assert out.advantages.tolist() == [b.advantages[2].tolist(), b.advantages[0].tolist()]
    assert out.bad_rows.tolist() == [False, False]  # the typed per-row flags travel with their rows


def test_select_leaves_unset_fields_unset():
    out = _packed().select(slice(0, 2))
    assert out.ref_logprobs is None and out.returns is None
    assert len(out) == 2


def test_split_then_concat_round_trips():
    b = _filled(_packed())
    parts = b.split(3)
    assert [len(p) for p in parts] == [1, 1, 1]
    assert parts[1].scores.tolist() == [2.0]
    assert parts[1].input_ids.tolist() == [[PAD, PAD, 8, 13, 14, 15, 16]]
    _assert_same(ExperienceBatch.concat(parts), b)


def test_split_of_a_batch_of_six_into_two():
    b = _filled(_packed())
    six = ExperienceBatch.concat([b, b])
    first, second = six.split(2)
    _assert_same(first, b)
    _assert_same(second, b)


def test_split_needs_exact_division():
    with pytest.raises(ValueError, match="cannot split a batch of 3 into 2 equal parts"):
        _packed().split(2)


def test_chunks_cover_rows_in_order():
    b = _filled(_packed())
    chunks = b.chunks(2)
    assert [len(c) for c in chunks] == [2, 1]
    _assert_same(ExperienceBatch.concat(chunks), b)
    assert [len(c) for c in b.chunks(5)] == [3]


def test_concat_rejects_different_prompt_or_response_lengths():
    b = _packed()
    other = pack_generation(Generation([[5]], [[3]], [[-1.0]], ["stop"], [0]), PAD, [EOS])
    with pytest.raises(ValueError, match=r"cannot concat batches with different \(P, R\)"):
        ExperienceBatch.concat([b, other])


def test_trim_drops_all_padding_columns():
    b = _filled(_packed())
    row = b.select(slice(2, 3))  # prompt [9, 10] (one pad column), response [17, EOS] (two pad columns)
    out = row.trim()
    assert out.input_ids.tolist() == [[9, 10, 17, EOS]]
    assert out.attention_mask.all()
    assert out.position_ids.tolist() == [[0, 1, 2, 3]]
    assert out.prompt_len == 2
    assert out.response_mask.tolist() == [[True, True]]
    assert out.rollout_logprobs.tolist() == [[-0.5, -0.25]]
    # every (B, R) field is trimmed the same way; (B,) fields are untouched
    assert out.advantages.tolist() == row.advantages[:, :2].tolist()
    assert out.old_values.tolist() == row.old_values[:, :2].tolist()
    assert out.scores.tolist() == [3.0]
    assert out.truncated.tolist() == [False]


def test_trim_of_one_row_equals_packing_it_alone():
    gen = _generation()
    alone = pack_generation(Generation([gen.prompt_ids[2]], [gen.response_ids[2]], [gen.logprobs[2]],
                                       [gen.finish_reasons[2]], [gen.prompt_index[2]]), PAD, [EOS])
    _assert_same(_packed().select(slice(2, 3)).trim(), alone)


def test_trim_of_a_tight_batch_changes_nothing():
    b = _filled(_packed())  # row 0 has a full prompt, row 1 a full response
    _assert_same(b.trim(), b)


def test_trim_keeps_one_response_column_when_all_are_empty():
    gen = Generation([[5, 6]], [[]], [[]], ["stop"], [0])
    out = pack_generation(gen, PAD, [EOS]).trim()
    assert out.response_mask.shape == (1, 1)
    assert out.input_ids.tolist() == [[5, 6, PAD]]


# --------------------------------------------------------------------------- padding-free packing


def test_pack_rows_hand_example():
    # The docstring's example: prompts [5, 6] and [7], responses [8] and [9, 10].
    gen = Generation([[5, 6], [7]], [[8], [9, 10]], [[-1.0], [-1.0, -2.0]], ["stop", "stop"], [0, 1])
    batch = pack_generation(gen, pad_id=0)
    rows = pack_rows(batch)  # rows of at most the longest sequence (3 tokens)
    assert rows.input_ids.tolist() == [[5, 6, 8], [7, 9, 10]]
    assert rows.position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert rows.keep_index.tolist() == [1, 3, 4]
    one = pack_rows(batch, row_tokens=6)
    assert one.input_ids.tolist() == [[5, 6, 8, 7, 9, 10]]
    assert one.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert one.keep_index.tolist() == [1, 3, 4]
    assert rows.num_tokens == one.num_tokens == 6
    # The predicted tokens, read at keep_index + 1, are the responses in response_mask order.
    for r in (rows, one):
        assert r.input_ids.reshape(-1)[r.keep_index + 1].tolist() == batch.response_ids[batch.response_mask].tolist()


def test_pack_rows_first_fit_decreasing_with_a_filler_run():
    # Lengths 5, 2, 3, 1 (prompt + response): cap 5 -> rows [seq 0], [seq 2, seq 1], [seq 3 + filler].
    gen = Generation([[1, 2, 3], [4], [5, 6], [7]], [[8, 9], [10], [11], []], [[0.0] * 2, [0.0], [0.0], []],
                     ["stop"] * 4, [0, 1, 2, 3])
    batch = pack_generation(gen, pad_id=0)
    rows = pack_rows(batch)
    assert rows.input_ids.tolist() == [[1, 2, 3, 8, 9], [5, 6, 11, 4, 10], [7, 0, 0, 0, 0]]
    # The filler run restarts at 0, so it is a sequence of its own and attends only to itself.
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert rows.keep_index.tolist() == [2, 3, 8, 6]
    assert rows.input_ids.reshape(-1)[rows.keep_index + 1].tolist() == batch.response_ids[batch.response_mask].tolist()
    # No row is longer than the longest sequence, so the attention costs at most the padded batch's.
    assert rows.input_ids.shape[1] == int(batch.attention_mask.sum(-1).max())
    # A cap below the longest sequence is raised to it; a large one gives a single row.
    assert pack_rows(batch, row_tokens=2).input_ids.shape == (3, 5)
    assert pack_rows(batch, row_tokens=100).input_ids.shape == (1, 11)


def test_pack_rows_of_a_trimmed_slice_matches_the_whole():
    gen = Generation([[4, 5, 6], [7], [8, 9]], [[10, 11, 12], [13], []], [[0.0] * 3, [0.0], []],
                     ["length", "stop", "stop"], [0, 1, 2])
    batch = pack_generation(gen, pad_id=0)
    whole = pack_rows(batch)
    part = pack_rows(batch.select(torch.tensor([1, 2])).trim())
    assert part.input_ids.tolist() == [[7, 13], [8, 9]]
    assert part.keep_index.tolist() == [0]  # sequence 2 has no response token
    assert whole.keep_index.tolist() == [2, 3, 4, 6]


def test_pack_rows_needs_a_prompt_token():
    batch = pack_generation(Generation([[4]], [[5]], [[0.0]], ["stop"], [0]), pad_id=0)
    empty_prompt = batch.replace(attention_mask=batch.attention_mask & torch.tensor([[False, True]]))
    with pytest.raises(ValueError, match="at least one prompt token"):
        pack_rows(empty_prompt)


def test_token_balanced_parts_hand_examples():
    assert token_balanced_parts([5, 1, 4, 2], 2) == [[0, 1], [2, 3]]  # 6 and 6 tokens
    assert token_balanced_parts([5, 1, 4, 2], 3) == [[0], [2], [1, 3]]  # 5, 4, 3
    assert token_balanced_parts([3, 3, 3], 1) == [[0, 1, 2]]
    assert token_balanced_parts([2, 2], 2) == [[0], [1]]
    with pytest.raises(ValueError, match="non-empty parts"):
        token_balanced_parts([1, 2], 3)


def test_parts_for_budget_hand_examples():
    assert parts_for_budget([5, 1, 4, 2], 6) == 2
    assert parts_for_budget([5, 1, 4, 2], 5) == 3
    assert parts_for_budget([5, 1, 4, 2], 100) == 1
    # A sequence over the budget gets a part to itself; the rest still respect the budget.
    assert parts_for_budget([10, 1, 1], 3) == 2
    assert parts_for_budget([10, 3, 3], 3) == 3
    with pytest.raises(ValueError, match="max_tokens"):
        parts_for_budget([1], 0)


def test_parts_for_budget_is_the_fewest_within_the_budget():
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        budget = int(torch.randint(10, 80, (1,), generator=gen))
        k = parts_for_budget(lengths, budget)
        groups = token_balanced_parts(lengths, k)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(len(g) == 1 or sum(lengths[i] for i in g) <= budget for g in groups)
        if k > 1:  # one part fewer breaks the budget (for this greedy split)
            fewer = token_balanced_parts(lengths, k - 1)
            assert any(len(g) > 1 and sum(lengths[i] for i in g) > budget for g in fewer)


def test_plan_passes_by_rows_hand_examples():
    assert plan_passes(5, max_rows=2) == [[0, 1], [2, 3], [4]]
    assert plan_passes(4, max_rows=2) == [[0, 1], [2, 3]]
    assert plan_passes(3, max_rows=8) == [[0, 1, 2]]
    assert plan_passes(0, max_rows=2) == []
    # An agreed pass count pads with None (a rank with fewer rows still runs every forward).
    assert plan_passes(5, max_rows=2, passes=4) == [[0, 1], [2, 3], [4], None]
    assert plan_passes(5, max_rows=2, passes=3) == [[0, 1], [2, 3], [4]]
    assert plan_passes(0, max_rows=2, passes=2) == [None, None]


def test_plan_passes_by_token_budget_hand_examples():
    lengths = [5, 1, 4, 2]
    assert plan_passes(4, lengths=lengths, max_tokens=6) == [[0, 1], [2, 3]]  # 6 and 6 tokens
    assert plan_passes(4, lengths=lengths, max_tokens=5) == [[0], [2], [1, 3]]  # 5, 4, 3
    # max_rows is ignored under a budget; an agreed micro-batch count re-splits the rows.
    assert plan_passes(4, max_rows=1, lengths=lengths, max_tokens=100) == [[0, 1, 2, 3]]
    assert plan_passes(4, lengths=lengths, max_tokens=6, parts=3) == [[0], [2], [1, 3]]
    # An agreed pass count keeps this rank's own split and pads it.
    assert plan_passes(4, lengths=lengths, max_tokens=6, passes=3) == [[0, 1], [2, 3], None]
    assert plan_passes(0, lengths=[], max_tokens=6) == []


def test_plan_passes_refuses_what_it_cannot_plan():
    with pytest.raises(ValueError, match="length of each of the 3 sequences"):
        plan_passes(3, lengths=[1, 2], max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens > 0 or max_rows > 0"):
        plan_passes(3)
    with pytest.raises(ValueError, match="parts splits by token budget"):
        plan_passes(3, max_rows=1, parts=2)
    with pytest.raises(ValueError, match="2 agreed passes are fewer than the 3"):
        plan_passes(5, max_rows=2, passes=2)


# --------------------------------------------------------------------------- train updates


def test_train_update_splits_like_the_batch_and_applies_to_the_kept_slice():
    b = _filled(_packed())  # 3 rows
    both = ExperienceBatch.concat([b, b])  # 6 rows, 2 ranks of 3
    good = both.response_mask.clone()
    good[1] = False  # row 1 quarantined
    old = both.old_logprobs.clone()
    old[1, 0] = float("nan")
    both = both.replace(old_logprobs=old)
    update = TrainUpdate(both.advantages * 2, both.returns * 3, good)
    parts, slices = update.split(2), both.split(2)
    assert [p.advantages.shape for p in parts] == [(3, 4), (3, 4)]
    ready = parts[0].apply_to(slices[0])
    assert torch.equal(ready.advantages, slices[0].advantages * 2) and torch.equal(ready.returns, slices[0].returns * 3)
    assert torch.equal(ready.response_mask, good[:3])
    assert ready.old_logprobs[1].tolist() == [0.0] * 4  # the NaN of the quarantined row is gone
    assert torch.equal(ready.old_logprobs[0][good[0]], slices[0].old_logprobs[0][good[0]])
    assert torch.equal(ready.input_ids, slices[0].input_ids)  # the rest is the kept slice's


def test_train_update_refuses_a_mismatched_or_unscored_slice():
    b = _filled(_packed())
    update = TrainUpdate.of(b)
    with pytest.raises(ValueError, match="does not match the shard"):
        update.apply_to(ExperienceBatch.concat([b, b]))
    with pytest.raises(ValueError, match="compute_old must run before train"):
        update.apply_to(b.replace(old_logprobs=None))
    with pytest.raises(ValueError, match="cannot split an update of 3 rows into 2"):
        update.split(2)
