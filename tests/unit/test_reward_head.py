"""A reward model's score read at each row's last attended token (``rlhf_ray/models/reward_head.py``).

- ``last_token_index``: hand values for left and right padding (3 rows x 5 positions).
- ``pooled_scores`` equals transformers' own pooled logits where those are right (a pad id that
  never occurs in the rows), for left and right padding, and lets gradients through.
- Where the pad id is EOS, transformers reads the token before a final EOS, so a finished and a
  cut-off answer look alike; ``pooled_scores`` reads the EOS.
- A model without a per-token ``score`` head, and a row without tokens, are clear errors.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.models.reward_head import last_token_index, pooled_scores, score_head

PAD, BOS, EOS = 0, 1, 2


def test_last_token_index_hand_values():
    mask = torch.tensor([[0, 0, 1, 1, 1],  # left-padded
                         [1, 1, 1, 0, 0],  # right-padded
                         [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [4, 2, 4]
    assert last_token_index(mask.long()).tolist() == [4, 2, 4]  # a 0/1 mask alike


def test_a_row_without_tokens_is_an_error():
    with pytest.raises(ValueError, match="has no attended token"):
        last_token_index(torch.tensor([[True, True], [False, False]]))


def _llama_rm(pad_id: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, num_labels=1, pad_token_id=pad_id, bos_token_id=BOS,
        eos_token_id=EOS))
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # large enough that the token read shows
    return model.eval()


def _padded(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = True
    return ids, mask


ROWS = [[BOS, 5, 6, 7, EOS], [BOS, 8, 9], [BOS, 10, 11, 12]]  # finished, cut off, cut off


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
def test_pooled_scores_are_transformers_scores_where_the_pad_id_never_occurs(left):
    model = _llama_rm(pad_id=PAD)  # PAD appears in no row: transformers finds each row's last token
    ids, mask = _padded(ROWS, PAD, left)
    with torch.no_grad():
        ours = pooled_scores(model, score_head(model), ids, mask)
        theirs = model(input_ids=ids, attention_mask=mask.long()).logits
    assert ours.shape == (3, 1)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_with_pad_equal_to_eos_the_final_eos_is_read():
    """pad id == EOS: transformers' pooling skips a finished row's EOS (it reads the token before),
    so the finished answer and the same answer cut off score alike; the mask's last position does not."""
    model = _llama_rm(pad_id=EOS)
    finished, cut = [BOS, 5, 6, 7, EOS], [BOS, 5, 6, 7]
    ids, mask = _padded([finished, cut], EOS, left=True)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask.long()).logits[:, 0]
        ours = pooled_scores(model, score_head(model), ids, mask)[:, 0]
        alone = [model(input_ids=torch.tensor([r])).logits[0, 0] for r in (finished, cut)]
    assert abs(theirs[0] - theirs[1]) < 1e-5  # the defect: EOS unseen
    assert abs(ours[0] - ours[1]) > 1e-3
    # Each row's score is its last token's: the cut-off row as transformers reads it alone (no pad in it).
    torch.testing.assert_close(ours[1], alone[1], atol=1e-5, rtol=0)


def test_gradients_reach_the_head_and_the_body():
    model = _llama_rm(pad_id=PAD).train()
    ids, mask = _padded(ROWS, PAD, left=False)
    pooled_scores(model, score_head(model), ids, mask).sum().backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_the_hook_is_removed_after_the_call():
    model = _llama_rm(pad_id=PAD)
    ids, mask = _padded(ROWS, PAD, left=True)
    with torch.no_grad():
        pooled_scores(model, score_head(model), ids, mask)
    assert not model.score._forward_hooks


def test_a_model_without_a_score_head_is_refused():
    with pytest.raises(ValueError, match="has no per-token `score` head.*ForSequenceClassification"):
        score_head(torch.nn.Linear(2, 1))
