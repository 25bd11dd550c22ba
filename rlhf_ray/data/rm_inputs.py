"""How a (prompt, response) pair becomes the token ids a reward model reads: one rule for
reward-model training (``supervised/data.py``), PPO's prompts (``data/prompts.py``) and the PPO
reward role (``workers/frozen.py``), so the model scores in PPO exactly the sequences it was
trained on.

    ids = prompt_ids(prompt) + response_ids(response)      each tokenised on its own

- **prompt**: the tokenizer's special tokens (e.g. Llama's BOS) are added to a plain prompt, and
  not to a chat rendering (the template wrote them) nor to a text that already begins with the
  BOS token (a prompt file of pre-rendered chats): one BOS either way, never two.
- **response**: no special tokens; a *finished* response ends with EOS (anything after its first
  EOS is cut, since generation stops there; EOS is appended when it has none) and a cut-off one
  has none, so the model can tell the two apart: training and the reward role read the score at
  each sequence's last token (``rlhf_ray/models/reward_head.py``), that EOS, also where the pad
  token is EOS. Training's responses are finished.

Prompt and response are tokenised separately, as SFT tokenises them (``tokenize_sft``) and as
PPO holds them (prompt ids from the loader, response ids sampled). So when the policy and the
reward model share a tokenizer (:func:`same_tokenizer`; the SFT -> RM -> PPO pipeline, where the
RM starts from the SFT model) the reward role reads the batch's ids as they are: no
decode/re-encode round trip. With another tokenizer, :func:`decode_pair` recovers the texts and
the reward model's tokenizer encodes them by the same rule.

Imports nothing at module level beyond the standard library; ``tokenizer`` is a Hugging Face
tokenizer, or anything called as ``tokenizer(text, add_special_tokens=...)["input_ids"]``.
"""

from __future__ import annotations

from typing import Sequence

# Any text works; this one has digits, a space run, a non-ASCII letter and the usual BOS/EOS markers.
_PROBE = "Probe: 12 apples,  naïve <s> text </s> ok"


def adds_special_tokens(tokenizer, text: str, chat: bool) -> bool:
    """Whether a prompt is tokenised with the tokenizer's special tokens: only a plain prompt that
    does not already begin with the BOS token."""
    bos = getattr(tokenizer, "bos_token", None)
    return not chat and not (isinstance(bos, str) and bos != "" and text.startswith(bos))


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of one prompt (``chat``: a chat-template rendering)."""
    return list(tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, text, chat))["input_ids"])


def encode_prompts(tokenizer, texts: Sequence[str], chat: bool) -> list[list[int]]:
    """:func:`prompt_ids` of each text, in at most two batched tokenizer calls."""
    flags = [adds_special_tokens(tokenizer, t, chat) for t in texts]
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        index = [i for i, f in enumerate(flags) if f == flag]
        if index:
            for i, ids in zip(index, tokenizer([texts[i] for i in index], add_special_tokens=flag)["input_ids"]):
                out[i] = list(ids)
    return out


def end_response(ids: Sequence[int], eos_id: int | None, finished: bool) -> list[int]:
    """A finished response up to and including its first EOS (EOS appended when it has none); a
    cut-off one (or a tokenizer without EOS) as it is."""
    ids = list(ids)
    if not finished or eos_id is None:
        return ids
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids + [eos_id]


def encode_responses(tokenizer, texts: Sequence[str], finished: bool = True) -> list[list[int]]:
    """Token ids of each response text, without special tokens, ended per :func:`end_response`."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    return [end_response(ids, eos, finished) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def pair_ids(tokenizer, prompt: str, response: str, chat: bool, finished: bool = True) -> tuple[list[int], int]:
    """(reward-model input ids, number of prompt tokens) of one (prompt, response) text pair."""
    p = prompt_ids(tokenizer, prompt, chat)
    return p + encode_responses(tokenizer, [response], finished)[0], len(p)


def decode_pair(tokenizer, prompt: Sequence[int], response: Sequence[int]) -> tuple[str, str, bool]:
    """(prompt text, response text, finished) of a policy's ids, for a reward model with another
    tokenizer: the policy's leading BOS and the response's final EOS are left out (the reward
    model's tokenizer puts in its own, by :func:`pair_ids` with ``chat=False``), every other
    special token (a chat template's markup) stays in the text. ``finished``: the response ended
    with EOS.

    Exact for plain prompts; a chat prompt is scored as its rendering under the policy's
    template, which is what the reward model was trained on only when both tokenizers know that
    template's tokens."""
    prompt, response = list(prompt), list(response)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if prompt and bos is not None and prompt[0] == bos:
        prompt = prompt[1:]
    finished = bool(response) and eos is not None and response[-1] == eos
    if finished:
        response = response[:-1]

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return text(prompt), text(response), finished


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids for the same text: the same vocabulary (added
    tokens included), BOS and EOS, and the same ids for a probe text with and without special
    tokens. (The pad token may differ: the supervised trainers save an RM whose tokenizer had no
    pad token with pad = EOS.)"""
    if a.get_vocab() != b.get_vocab():
        return False
    if (a.bos_token_id, a.eos_token_id) != (b.bos_token_id, b.eos_token_id):
        return False
    return all(a(_PROBE, add_special_tokens=s)["input_ids"] == b(_PROBE, add_special_tokens=s)["input_ids"]
               for s in (True, False))
