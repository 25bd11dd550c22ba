"""The critic started from a reward model (``model.value_init reward_model``).

InstructGPT (Ouyang et al., 2022) initialises PPO's value function from the reward model, and
most PPO recipes since do the same: the reward model already maps a sequence to a scalar that
predicts the final reward, which is what the value learns first. Two ways here:

- separate critic (``model.separate_critic``): the critic's body is the reward model's body
  (``AutoModel`` loaded from its ``*ForSequenceClassification`` checkpoint) and the value head
  starts as its score head, so the critic's value at a sequence's last token equals the reward
  model's score of that sequence;
- shared body: the value head starts as the reward model's score head applied to the policy's
  hidden states. Meaningful when the policy and the reward model come from one base model (the
  SFT -> RM pipeline); possible only when the hidden sizes agree (:func:`value_init_error`).

A reward model's score head is ``score`` of transformers' ``*ForSequenceClassification`` (Llama,
Qwen2, Mistral, GPT-2, ...: ``score.weight`` (num_labels, H), no bias), which is what the RM
trainer (``rlhf_ray/supervised/trainer.py``) saves. It is read straight from the checkpoint's
safetensors, one tensor, so no model is built for it and no collective runs (ZeRO-3 loads the
bodies with collectives; this read is the same on every rank).

Shapes: H hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

SCORE_WEIGHT = "score.weight"
SCORE_BIAS = "score.bias"


def _file_holding(path: Path, name: str) -> Path | None:
    """The safetensors file of checkpoint directory ``path`` that holds tensor ``name`` (sharded
    checkpoints: from ``model.safetensors.index.json``), or None."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(name)
        return path / shard if shard else None
    single = path / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), "pt") as f:
        return single if name in f.keys() else None


def _no_score_head(path: Path) -> ValueError:
    return ValueError(f"the reward model {str(path)!r} has no score head ({SCORE_WEIGHT} in its safetensors), so the "
                      "critic cannot start from it: --model.value_init reward_model needs a sequence-classification "
                      "checkpoint with one label (*ForSequenceClassification, as the RM trainer saves). Use "
                      "--model.value_init policy, or point --reward.model_path at such a checkpoint.")


def score_head_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of the reward model's ``score.weight`` (num_labels, H), read from the file header
    only; a clear ValueError when the checkpoint has none."""
    path = Path(path)
    file = _file_holding(path, SCORE_WEIGHT)
    if file is None:
        raise _no_score_head(path)
    with safe_open(str(file), "pt") as f:
        return tuple(f.get_slice(SCORE_WEIGHT).get_shape())


def value_head_from_reward_model(path: str | Path, hidden_size: int) -> dict[str, torch.Tensor]:
    """The reward model's score head as the state dict of a value head on hidden states of size
    ``hidden_size``: ``linear.weight`` (1, H) float32 (its score weight), ``linear.bias`` (1,)
    float32 (its score bias, 0 where the head has none, as in Llama, Qwen2 and GPT-2). A checkpoint
    without a one-label score head, or one of another hidden size, is an error."""
    path = Path(path)
    file = _file_holding(path, SCORE_WEIGHT)
    if file is None:
        raise _no_score_head(path)
    with safe_open(str(file), "pt") as f:
        weight = f.get_tensor(SCORE_WEIGHT).to(torch.float32)
    if weight.dim() != 2 or weight.shape[0] != 1:
        raise ValueError(f"the reward model {str(path)!r} scores {weight.shape[0]} labels ({SCORE_WEIGHT} has shape "
                         f"{tuple(weight.shape)}); a value is one number, so --model.value_init reward_model needs a "
                         "reward model with one label.")
    if weight.shape[1] != hidden_size:
        raise ValueError(f"the reward model {str(path)!r} has a score head on hidden states of size {weight.shape[1]}, "
                         f"but the value head reads hidden states of size {hidden_size}; with different hidden sizes "
                         "use --model.separate_critic true (the critic is then the reward model), or "
                         "--model.value_init policy.")
    bias_file = _file_holding(path, SCORE_BIAS)
    bias = torch.zeros(1)
    if bias_file is not None:
        with safe_open(str(bias_file), "pt") as f:
            bias = f.get_tensor(SCORE_BIAS).to(torch.float32).reshape(1)
    return {"linear.weight": weight.contiguous(), "linear.bias": bias.contiguous()}


def reward_model_body(path: str | Path, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
    """The reward model's transformer body (``AutoModel``) in ``dtype``: its checkpoint's weights
    but the score head. transformers' load report would list that head as unexpected at length on
    every rank, so it is read here instead: anything else left out, new or mismatched is an error
    (a critic body with freshly initialised layers would be no reward model). ``kwargs`` go to
    ``from_pretrained`` (e.g. attn_implementation)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        body, info = AutoModel.from_pretrained(str(path), dtype=dtype, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    odd = {kind: sorted(str(k) for k in info.get(kind, []) if not (kind == "unexpected_keys" and
                                                                    str(k).startswith("score.")))
           for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    odd = {kind: keys for kind, keys in odd.items() if keys}
    if odd:
        raise ValueError(f"loading the reward model {str(path)!r} as the critic's body left weights out, new or "
                         f"mismatched beyond its score head: {odd}. --model.value_init reward_model with "
                         "--model.separate_critic needs a decoder reward model saved as *ForSequenceClassification.")
    return body


def value_init_error(policy_path: str, reward_path: str, separate_critic: bool) -> str | None:
    """Why the critic cannot start from the reward model at ``reward_path``, or None; reads the two
    checkpoints' config.json files, the score head's shape and (separate critic) the tokenizers,
    no weights. Shared body: the value head reads the policy's hidden states, so its hidden size
    must be the reward model's. Separate critic: the critic reads the policy's token ids, so the
    reward model's tokenizer must be the policy's."""
    from transformers import AutoConfig, AutoTokenizer

    from rlhf_ray.data.rm_inputs import same_tokenizer

    try:
        shape = score_head_shape(reward_path)
    except ValueError as exc:
        return str(exc)
    if len(shape) != 2 or shape[0] != 1:
        return (f"the reward model {reward_path!r} scores {shape[0]} labels (score.weight {shape}); a value is one "
                "number, so --model.value_init reward_model needs a reward model with one label.")
    if separate_critic:
        if not same_tokenizer(AutoTokenizer.from_pretrained(policy_path), AutoTokenizer.from_pretrained(reward_path)):
            return (f"--model.value_init reward_model with --model.separate_critic: the critic (the reward model "
                    f"{reward_path!r}) would read the policy's token ids, but its tokenizer differs from the policy's "
                    f"({policy_path!r}), so it would read other words. Use a reward model trained on the policy's "
                    "tokenizer, or --model.value_init policy.")
        return None
    policy_h = int(AutoConfig.from_pretrained(policy_path).get_text_config().hidden_size)
    if shape[1] != policy_h:
        return (f"--model.value_init reward_model with the shared body: the value head reads the policy's hidden "
                f"states of size {policy_h} ({policy_path!r}), but the reward model's score head "
                f"({reward_path!r}) reads hidden states of size {shape[1]}. Use --model.separate_critic true (the "
                "critic is then the reward model, body and score head), or --model.value_init policy.")
    return None
