"""Actor-critic over a Hugging Face causal LM: one body pass gives logits and values.

Shapes: B sequences, T tokens, V vocab, H hidden size.

The policy is a plain ``AutoModelForCausalLM`` kept as ``self.policy`` so that its
weights (``policy.*`` names) are exactly an HF checkpoint: vLLM and transformers load
what ``save_pretrained`` writes without conversion. The critic is a float32
``ValueHead`` on the policy's final hidden states (shared body), or on the hidden
states of a separate body (``critic_body``) for A/B comparisons.

State-dict layout of an ``ActorCritic`` (what DeepSpeed gathers under ZeRO-3):
``policy.<hf name>``, ``value_head.linear.{weight,bias}``, ``critic_body.<hf name>``.
``split_state_dict`` takes such a dict apart; ``save_pretrained(..., state_dict=...)``
writes a gathered one without needing materialised module parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from rlhf_ray.models.lora import LoraSpec, add_lora
from rlhf_ray.models.value_head import ValueHead
from rlhf_ray.models.value_init import reward_model_body, value_head_from_reward_model

VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_SUBDIR = "critic"
POLICY_PREFIX = "policy."
VALUE_HEAD_PREFIX = "value_head."
CRITIC_PREFIX = "critic_body."


class ActorCriticOutput(NamedTuple):
    """logits (B, T, V) in the body's dtype; values (B, T) float32 (T becomes R, the response
    length, when ``forward`` was given ``response_len``; (1, N) with ``keep_index``).
    ``value_hidden`` (B, T, H): set instead of ``values`` when the head is held outside."""

    logits: torch.Tensor
    values: torch.Tensor | None
    value_hidden: torch.Tensor | None = None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) int64 that count only real tokens: left padding gets 0.

    attention_mask (B, T), 1/True = real token. Matches what an inference engine sees
    for an unpadded sequence, e.g. mask [0, 0, 1, 1, 1] -> [0, 0, 0, 1, 2].
    """
    mask = attention_mask.long()
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def response_positions(response_len: int) -> slice:
    """The positions (along T) whose outputs predict the last ``response_len`` tokens of a
    right-aligned sequence: position t predicts token t + 1, so ``T-R-1 .. T-2``. E.g. T = 5,
    R = 2: slice(-3, -1), positions 2 and 3 predict tokens 3 and 4."""
    return slice(-response_len - 1, -1)


def _is_dropout_name(name: str) -> bool:
    # Llama/Qwen2: attention_dropout; BERT: hidden_dropout_prob; T5: dropout_rate;
    # GPT-2: attn_pdrop / resid_pdrop / embd_pdrop; GPT-2 heads: summary_first_dropout.
    return "dropout" in name or name.endswith("_pdrop")


def _is_rate(value: object) -> bool:
    return isinstance(value, (float, int)) and not isinstance(value, bool)


def _zero_config_dropout(config: PretrainedConfig, seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _zero_config_dropout(value, seen)
        elif _is_dropout_name(name) and _is_rate(value):
            setattr(config, name, 0.0)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Make train() and eval() forwards identical; returns ``model`` (changed in place).

    Three places hold dropout rates in HF models: ``nn.Dropout*`` modules (p -> 0);
    configs (``attention_dropout``, ``*_pdrop`` ... on ``model.config`` and nested
    sub-configs, -> 0.0); and float attributes copied from the config at construction
    (Llama/Qwen2 attention keep ``self.attention_dropout`` and pass it to SDPA only in
    training mode), so zeroing the config alone would not be enough.
    PPO needs this: at the first epoch the new/old probability ratio must be exactly 1.
    """
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            _zero_config_dropout(config, seen)
        for name, value in list(vars(module).items()):
            if _is_dropout_name(name) and isinstance(value, float) and value != 0.0:
                setattr(module, name, 0.0)
    return model


def _body_of(model: PreTrainedModel) -> nn.Module:
    """The transformer body of a ``*ForCausalLM`` (``model.model`` for Llama/Qwen2)."""
    body = model.base_model
    if body is model:
        raise TypeError(f"{type(model).__name__} has no separate body (base_model is itself)")
    return body


# Attention implementations that build the block-diagonal mask of packed rows from the
# position restarts themselves (transformers' mask functions, for any number of rows).
_MASK_FROM_POSITIONS = ("sdpa", "eager")


def packed_attention_kwargs(config: PretrainedConfig, position_ids: torch.Tensor) -> dict:
    """Extra body kwargs for packed rows (position_ids (K, L) restarting at 0 per sequence, no
    attention mask): none for sdpa/eager, whose masks transformers derives from the position
    restarts; else (flash attention and other kernels) the varlen boundaries over the flattened
    K*L tokens, ``cu_seq_lens_q/k`` (int32, starts of every run plus K*L) and ``max_length_q/k``.
    Without them transformers' flash path detects packing only in a single row (batch size 1)
    and attends across the sequences of a row when K > 1."""
    if config._attn_implementation in _MASK_FROM_POSITIONS:
        return {}
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q), "max_length_k": int(max_k)}


def causal_lm_logits_at(model: PreTrainedModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                        keep_index: torch.Tensor) -> torch.Tensor:
    """Logits (1, N, V) of a ``*ForCausalLM`` at ``keep_index``, N indices into the flattened
    (K*L) positions of packed rows (``rlhf_ray.batch.PackedRows``): the body runs over the rows
    with no attention mask and no KV cache (transformers derives the per-sequence mask from the
    position restarts; flash kernels get the boundaries, ``packed_attention_kwargs``), the LM
    head only at the kept positions (as in ``ActorCritic``)."""
    body = _body_of(model)
    hidden = body(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                  **packed_attention_kwargs(body.config, position_ids)).last_hidden_state
    return model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep_index).unsqueeze(0))


def _hidden_size(config: PretrainedConfig) -> int:
    return int(config.get_text_config().hidden_size)


def save_value_head(state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write a value head's state dict to ``out_dir/value_head.safetensors`` (float32).

    Accepts the head's own keys (``linear.weight``) or ActorCritic keys
    (``value_head.linear.weight``); other keys are an error.
    """
    clean: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        short = key[len(VALUE_HEAD_PREFIX):] if key.startswith(VALUE_HEAD_PREFIX) else key
        if not short.startswith("linear."):
            raise KeyError(f"unexpected key {key!r} in value head state dict")
        clean[short] = tensor.detach().to("cpu", torch.float32).contiguous()
    path = Path(out_dir) / VALUE_HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(clean, str(path))
    return path


def load_value_head(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The value head state dict saved in directory ``path``, or None if there is none."""
    file = Path(path) / VALUE_HEAD_FILE
    return load_file(str(file)) if file.is_file() else None


class ActorCritic(nn.Module):
    """Causal-LM policy plus a value head; see the module docstring for the layout.

    Args:
        policy: an ``AutoModelForCausalLM`` model (Llama, Qwen2, ...).
        value_head_init_std: std of the value head's initial weight (0: zeros).
        value_grad_to_body: if False, values are computed from detached hidden states,
            so a value loss trains only the head (the body gets no value gradient).
            With a separate critic this applies to the critic body.
        critic_body: optional separate body (``AutoModel``) whose last hidden state
            feeds the value head instead of the policy's.

    Dropout is always disabled (see ``disable_dropout``).
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        *,
        value_head_init_std: float = 0.0,
        value_grad_to_body: bool = True,
        critic_body: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if policy.get_output_embeddings() is None:
            name = type(policy).__name__
            raise TypeError(f"{name} has no output embeddings; pass a *ForCausalLM model")
        self.policy = policy
        self.critic_body = critic_body
        self.value_grad_to_body = value_grad_to_body
        value_config = critic_body.config if critic_body is not None else policy.config
        self.value_head: ValueHead | None = ValueHead(_hidden_size(value_config), init_std=value_head_init_std)
        disable_dropout(self)

    @property
    def separate_critic(self) -> bool:
        return self.critic_body is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        response_len: int | None = None,
        keep_index: torch.Tensor | None = None,
    ) -> ActorCriticOutput:
        """input_ids (B, T), attention_mask (B, T) 1 = real, position_ids (B, T) or None.

        position_ids default to ``positions_from_mask(attention_mask)`` (correct for
        left padding, unlike transformers' default 0..T-1). Returns logits (B, T, V)
        and values (B, T) float32 for every position, padding included.

        ``response_len=R`` (the last R of the T tokens are a response): logits (B, R, V)
        and values (B, R) only at the R positions that predict the response tokens,
        ``T-R-1 .. T-2``. The LM head then never runs over the prompt, which saves a
        (B, T-R, V) logits tensor: with a 150k vocabulary and 1k-token prompts that is
        the largest activation of the step.

        ``keep_index`` (N,) int64, for packed rows (see ``rlhf_ray.batch.PackedRows``):
        indices into the flattened (B*T) positions; logits (1, N, V) and values (1, N)
        are computed at those positions only. Packed rows pass ``attention_mask=None``
        and position ids that restart at 0 for each sequence: transformers then builds a
        block-diagonal causal mask (sdpa, eager), or the flash kernels get each sequence's
        boundaries (``packed_attention_kwargs``), so each sequence attends only to itself.

        With the value head held outside this module (``detach_value_head``), ``values``
        is None and ``value_hidden`` carries the hidden states (B, R, H) it would have read.

        Logits come from ``policy.get_output_embeddings()`` applied to the body's
        ``last_hidden_state`` (after the final norm): for Llama/Qwen2 that is exactly
        the computation inside ``*ForCausalLM.forward``, so the logits are bitwise the
        plain model's. (``output_hidden_states`` would also work, but its last entry's
        pre/post-norm convention has changed between transformers versions.)
        """
        if position_ids is None:
            if attention_mask is None:
                raise ValueError("pass position_ids when attention_mask is None (packed rows)")
            position_ids = positions_from_mask(attention_mask)
        if response_len is not None and keep_index is not None:
            raise ValueError("pass response_len or keep_index, not both")
        if response_len is not None and not 0 < response_len < input_ids.shape[1]:
            raise ValueError(
                f"response_len must be in [1, T-1] for T={input_ids.shape[1]} tokens "
                f"(at least one prompt token precedes the response), got {response_len}"
            )

        def select(hidden: torch.Tensor) -> torch.Tensor:
            if keep_index is not None:
                return hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep_index).unsqueeze(0)
            if response_len is not None:
                return hidden[:, response_positions(response_len)]
            return hidden

        hidden = select(self._last_hidden(_body_of(self.policy), input_ids, attention_mask, position_ids))
        logits = self.policy.get_output_embeddings()(hidden)
        value_hidden = hidden
        if self.critic_body is not None:
            value_hidden = select(self._last_hidden(self.critic_body, input_ids, attention_mask, position_ids))
        if not self.value_grad_to_body:
            value_hidden = value_hidden.detach()
        if self.value_head is None:
            return ActorCriticOutput(logits=logits, values=None, value_hidden=value_hidden)
        return ActorCriticOutput(logits=logits, values=self.value_head(value_hidden))

    def detach_value_head(self) -> ValueHead:
        """Remove the value head from this module and return it; ``forward`` then returns
        the hidden states the head reads instead of values.

        The learner trains the head outside the ZeRO engine: ZeRO-3 flattens every
        partitioned parameter into buffers of one dtype, so a float32 head cannot sit
        beside a bf16 body there, and a head cast to bf16 would quantise values of order
        1 to ~3 significant digits. Held outside, the head stays float32 on every ZeRO
        stage (see ``rlhf_ray.backends.replicated``)."""
        head = self.value_head
        if head is None:
            raise RuntimeError("the value head was already detached")
        self.value_head = None
        return head

    @staticmethod
    def _last_hidden(
        body: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Final hidden states (B, T, H) of a transformer body, without a KV cache (packed
        rows, ``attention_mask`` None: with their boundaries, ``packed_attention_kwargs``)."""
        extra = packed_attention_kwargs(body.config, position_ids) if attention_mask is None else {}
        out = body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
        return out.last_hidden_state

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        value_head_init_std: float = 0.0,
        value_grad_to_body: bool = True,
        separate_critic: bool = False,
        critic_path: str | Path | None = None,
        torch_dtype: torch.dtype = torch.float32,
        lora: LoraSpec | None = None,
        attn_implementation: str | None = None,
        value_from: str | Path | None = None,
    ) -> ActorCritic:
        """Load the policy from ``path``; the value head from ``path/value_head.safetensors``
        if present (else a fresh head); a separate critic body from ``critic_path``, else
        ``path/critic/`` if saved there, else ``path`` itself (policy weights, body only).
        ``value_from``: a reward model's checkpoint the critic starts from instead (model.value_init
        reward_model, ``rlhf_ray.models.value_init``): the value head is its score head, and a
        separate critic's body is its body (then ``critic_path`` must be None).
        ``lora``: add fresh LoRA adapters to the policy (and its own to a separate critic body)
        and freeze the rest of the bodies (``rlhf_ray.models.lora``); the value head stays trainable.
        ``attn_implementation``: transformers' attention kernel for both bodies (None: its default).
        """
        path = Path(path)
        attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
        policy = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **attn)
        critic_body = None
        if value_from is not None and critic_path is not None:
            raise ValueError("pass critic_path or value_from, not both: the critic starts as the reward model")
        if value_from is not None and separate_critic:
            critic_body = reward_model_body(value_from, torch_dtype, **attn)
        elif separate_critic or critic_path is not None:
            if critic_path is None:
                saved = path / CRITIC_SUBDIR
                critic_path = saved if (saved / "config.json").is_file() else path
            critic_body = AutoModel.from_pretrained(str(critic_path), dtype=torch_dtype, **attn)
        model = cls(
            policy,
            value_head_init_std=value_head_init_std,
            value_grad_to_body=value_grad_to_body,
            critic_body=critic_body,
        )
        hidden = model.value_head.hidden_size
        head_sd = load_value_head(path) if value_from is None else value_head_from_reward_model(value_from, hidden)
        if head_sd is not None:
            model.value_head.load_state_dict(head_sd, strict=True)
        if lora is not None:
            add_lora(model.policy, lora, "policy")
            if critic_body is not None:
                add_lora(critic_body, lora, "critic body")
        return model

    @staticmethod
    def split_state_dict(
        full_state_dict: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Split an ActorCritic state dict into (policy, value_head, critic_body) dicts,
        each with its prefix removed (policy keys become HF checkpoint names)."""
        parts: tuple[dict[str, torch.Tensor], ...] = ({}, {}, {})
        prefixes = (POLICY_PREFIX, VALUE_HEAD_PREFIX, CRITIC_PREFIX)
        for key, tensor in full_state_dict.items():
            for part, prefix in zip(parts, prefixes):
                if key.startswith(prefix):
                    part[key[len(prefix):]] = tensor
                    break
            else:
                raise KeyError(f"key {key!r} belongs to none of {prefixes}")
        return parts  # type: ignore[return-value]

    def save_pretrained(
        self,
        out_dir: str | Path,
        tokenizer=None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the policy as a standard HF checkpoint in ``out_dir``, the value head as
        ``out_dir/value_head.safetensors`` and a separate critic body in ``out_dir/critic/``.

        ``state_dict``: a full ActorCritic state dict to save instead of this module's
        own tensors, e.g. one gathered on rank 0 under ZeRO-3 (where the module's own
        parameters are empty partitions). ``tokenizer`` is saved beside the policy (and
        the critic) when given.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.state_dict()
        policy_sd, head_sd, critic_sd = self.split_state_dict(state_dict)
        self.policy.save_pretrained(str(out), state_dict=policy_sd)
        if head_sd:  # a critic-free run has no value head to save
            save_value_head(head_sd, out)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        if self.critic_body is not None:
            critic_dir = out / CRITIC_SUBDIR
            self.critic_body.save_pretrained(str(critic_dir), state_dict=critic_sd)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(critic_dir))
        return out
