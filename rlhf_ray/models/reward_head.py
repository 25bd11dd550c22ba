"""A reward model's score of each sequence, read at its last real token (the attention mask's).

transformers' ``*ForSequenceClassification`` models (``GenericForSequenceClassification`` in
transformers 5: Llama, Mistral, Qwen2, ...; GPT-2 alike) run the per-token ``score`` head over
every position and keep the logits of each row's *rightmost token whose id is not the config's
pad id*. Where the pad token is EOS (Llama 3, Mistral and Qwen2.5 base tokenizers, and the
supervised trainers' rule "pad = EOS when there is no pad token"), a finished response's final
EOS counts as padding: the model reads the token before it, and a finished answer and the same
answer cut off before EOS get the same score. ``rlhf_ray/data/rm_inputs.py`` promises the two
differ, so both reward-model training and PPO's reward role read the score here instead, at
each row's last attended position, whatever the ids.

How: a forward hook on the ``score`` head keeps its per-token output (B, L, num_labels) during
the model's own forward call, and the rows are read from it at the mask's last position. The
call stays one call of the top-level module (a DeepSpeed engine in training): ZeRO-3 gathers
and releases parameters in hooks around that call, so the base model and the head are not
called one by one. transformers' own pooled logits are computed too and ignored.
"""

from __future__ import annotations

from typing import Callable

import torch


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The per-token head (``score``) of a causal-LM ``*ForSequenceClassification`` model; a
    clear error for a model without one (an encoder classifier pools its own way)."""
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no per-token `score` head, so its reward cannot be read at "
                         "each sequence's last token; use a decoder reward model saved as *ForSequenceClassification "
                         "(e.g. LlamaForSequenceClassification, Qwen2ForSequenceClassification, "
                         "GPT2ForSequenceClassification).")
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64 index of each row's last True position of a (B, L) bool (or 0/1) attention mask;
    left or right padding alike. A row without any True position is an error."""
    mask = attention_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).max(dim=1).values
    if bool((last < 0).any()):
        raise ValueError("a reward-model row has no attended token (its attention mask is all False); every row "
                         "needs at least one token.")
    return last


def pooled_scores(forward: Callable[..., object], head: torch.nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, num_labels) scores, each row's ``head`` output at its last attended position.

    forward: the model, or the engine wrapping it, called once as
        ``forward(input_ids=..., attention_mask=..., position_ids=...)``;
    head: that model's per-token head (:func:`score_head`), whose output (B, L, num_labels) is read;
    input_ids: (B, L) int64; attention_mask: (B, L) bool, True = real token;
    position_ids: (B, L) int64 or None (the model's default positions).

    Gradients flow through the returned scores as through transformers' pooled logits."""
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _inputs, output: seen.append(output))
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    try:
        forward(input_ids=input_ids, attention_mask=attention_mask.long(), **kwargs)
    finally:
        handle.remove()
    assert len(seen) == 1, f"the score head ran {len(seen)} times in one forward pass"
    per_token = seen[0]
    last = last_token_index(attention_mask).to(per_token.device)
    return per_token[torch.arange(per_token.shape[0], device=per_token.device), last]
