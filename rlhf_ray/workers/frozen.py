"""Frozen-model roles: the reference policy and the reward model/function.

Both load a Hugging Face checkpoint once, never train, and run no-grad forward passes over
an ExperienceBatch in micro-batches. What differs is the head and the output, so the shared
loading/batching lives in ``FrozenModelRole`` and each role adds only its own call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from rlhf_ray.algorithms import logprobs_from_logits
from rlhf_ray.batch import ExperienceBatch, decode_rows, pack_rows, plan_passes
from rlhf_ray.config import Config, ReferenceConfig, RewardConfig, redact_url
from rlhf_ray.data.prompts import pad_token_id
from rlhf_ray.data.rm_inputs import decode_pair, pair_ids, same_tokenizer
from rlhf_ray.models import causal_lm_logits_at, positions_from_mask, response_positions
from rlhf_ray.models.reward_head import pooled_scores, score_head
from rlhf_ray.reward_calls import score_in_calls, with_named_errors
from rlhf_ray.rewards import field_parameters, load_reward_function
from rlhf_ray.workers.base import RoleBase


@dataclass(frozen=True)
class ReferenceSpec:
    """What the reference role reads."""

    reference: ReferenceConfig
    path: str  # reference.path, or model.path
    dtype: str  # model.dtype (bfloat16 applies on a GPU only)
    num_gpus: float  # resources.reference.num_gpus
    threads: int  # resources.reference.threads

    @staticmethod
    def from_config(cfg: Config) -> "ReferenceSpec":
        res = cfg.resources.reference
        return ReferenceSpec(cfg.reference, cfg.reference.path or cfg.model.path, cfg.model.dtype, res.num_gpus,
                             res.threads)


@dataclass(frozen=True)
class RewardSpec:
    """What the reward role reads."""

    reward: RewardConfig
    policy_path: str  # model.path: the policy's tokenizer decodes the responses
    dtype: str  # model.dtype (bfloat16 applies to a reward model on a GPU only)
    num_gpus: float  # resources.reward.num_gpus
    threads: int  # resources.reward.threads

    @staticmethod
    def from_config(cfg: Config) -> "RewardSpec":
        res = cfg.resources.reward
        return RewardSpec(cfg.reward, cfg.model.path, cfg.model.dtype, res.num_gpus, res.threads)


class FrozenModelRole(RoleBase):
    """Loads a model for inference only and runs it over batches in micro-batches."""

    micro_batch_size = 16
    device = torch.device("cpu")

    def _load(self, auto_cls, path: str, num_gpus: float, dtype_name: str) -> torch.nn.Module:
        """Load for inference: on the GPU Ray assigned (bf16 when ``dtype_name`` says so), else CPU fp32."""
        on_gpu = num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        dtype = torch.bfloat16 if (on_gpu and dtype_name == "bfloat16") else torch.float32
        model = auto_cls.from_pretrained(path, dtype=dtype).to(self.device)
        model.eval().requires_grad_(False)
        return model

    def _micro_batches(self, batch: ExperienceBatch) -> list[ExperienceBatch]:
        return [mb.trim().to(self.device) for mb in batch.chunks(self.micro_batch_size)]


class ReferenceModel(FrozenModelRole):
    """The frozen SFT policy; gives per-token logprobs of sampled responses."""

    role = "reference"

    def __init__(self, spec: ReferenceSpec, index: int = 0) -> None:
        super().__init__(index, spec.threads)
        from transformers import AutoModelForCausalLM

        self.spec = spec
        self.micro_batch_size = spec.reference.micro_batch_size
        self.model = self._load(AutoModelForCausalLM, spec.path, spec.num_gpus, spec.dtype)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._has_body = self.model.base_model is not self.model  # packing runs the body, then the LM head

    @torch.no_grad()
    def logprobs(self, batch: ExperienceBatch, temperature: float) -> torch.Tensor:
        """(B, R) float32 logprobs of the response tokens at ``temperature``; 0 at padding.

        With reference.packing each micro-batch's sequences are laid end to end in rows no longer
        than its longest sequence (``pack_rows``), so (almost) no FLOP is spent on padding; the LM
        head runs only at the positions that predict response tokens either way."""
        R = batch.response_mask.shape[1]
        out = torch.zeros(len(batch), R, dtype=torch.float32)
        row = 0
        for mb in self._micro_batches(batch):
            r = mb.response_mask.shape[1]
            mask = mb.response_mask[:, :r]
            if self.spec.reference.packing and self._has_body:
                rows = pack_rows(mb)
                logits = causal_lm_logits_at(self.model, rows.input_ids, rows.position_ids, rows.keep_index)
                flat = logprobs_from_logits(logits, mb.response_ids[mask].unsqueeze(0), temperature)
                lp = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)
            else:
                kwargs = {"logits_to_keep": r + 1} if self._keeps_logits else {}  # the LM head skips the prompt
                logits = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask.long(),
                                    position_ids=mb.position_ids, **kwargs).logits
                lp = logprobs_from_logits(logits[:, response_positions(r)], mb.response_ids, temperature) * mask
            out[row: row + len(mb), :r] = lp.cpu()
            row += len(mb)
        return out


class RewardScorer(FrozenModelRole):
    """One scalar per sample, from a sequence-classification reward model or a Python function.

    A reward model scores the token sequence it was trained on (``rlhf_ray/data/rm_inputs.py``):
    the prompt ids as the loader built them and the response ids as sampled, EOS included when
    the engine produced it. When the policy and the reward model share a tokenizer (the SFT ->
    RM -> PPO pipeline) those are the batch's ids as they are; otherwise the ids are decoded with
    the policy's tokenizer and encoded with the reward model's by the rule training used. The
    score is read at each sequence's last token (that EOS, also where the pad token is EOS), as
    training reads it (``rlhf_ray/models/reward_head.py``). A function or an endpoint gets texts
    with the special tokens removed (``decode``), and the prompt records' fields (``score``'s
    ``fields``): a function those it takes (``rlhf_ray.rewards.FieldParameters``), an endpoint
    all of them; a reward model none."""

    role = "reward"

    def __init__(self, spec: RewardSpec, index: int = 0) -> None:
        super().__init__(index, spec.threads)
        from transformers import AutoTokenizer

        self.spec = spec
        r = spec.reward
        self.micro_batch_size = r.micro_batch_size
        self.policy_tokenizer = AutoTokenizer.from_pretrained(spec.policy_path)
        self.fn = None
        if r.kind == "function":
            self.fn = load_reward_function(r.function or "")
            self.fn_fields = field_parameters(self.fn)
        elif r.kind == "model":
            from transformers import AutoModelForSequenceClassification

            self.model = self._load(AutoModelForSequenceClassification, r.model_path or "", spec.num_gpus, spec.dtype)
            self.rm_tokenizer = AutoTokenizer.from_pretrained(r.model_path)
            self.shares_tokenizer = same_tokenizer(self.policy_tokenizer, self.rm_tokenizer)
            self.head = score_head(self.model)
            # Padding is masked out and the score is read at each row's last attended token
            # (``pooled_scores``), so the pad id only fills the gaps; transformers still refuses a
            # batch of several rows when the config names no pad id.
            config_pad = getattr(self.model.config, "pad_token_id", None)
            self.pad_id = int(config_pad) if config_pad is not None else pad_token_id(self.rm_tokenizer)
            self.model.config.pad_token_id = self.pad_id

    def decode(self, batch: ExperienceBatch) -> tuple[list[str], list[str]]:
        """Prompt and response texts (padding and special tokens removed)."""
        return decode_rows(batch, self.policy_tokenizer)

    @torch.no_grad()
    def score(self, batch: ExperienceBatch, fields: dict[str, list] | None = None) -> torch.Tensor:
        """(B,) float32 scores. ``fields``: the prompt records' fields as columns, one value per row
        of ``batch`` (``PromptSet.columns``), or None when the records have none."""
        if self.spec.reward.kind == "model":
            return self._run_model(self.model_inputs(batch))
        prompts, responses = self.decode(batch)
        r = self.spec.reward
        if self.fn is not None:
            return self._call_function(prompts, responses, self.fn_fields.pick(fields))
        from rlhf_ray.reward_server import post_scores

        def post(p: list[str], q: list[str], /, **columns) -> list[float]:
            return post_scores(r.url or "", p, q, r.http_timeout_s, r.http_retries, r.http_backoff_s, columns)

        scores = score_in_calls(post, prompts, responses, fields=fields, samples_per_call=r.samples_per_call,
                                concurrency=r.concurrency, what=f"reward endpoint {redact_url(r.url or '')}")
        return torch.tensor(scores, dtype=torch.float32)

    def model_inputs(self, batch: ExperienceBatch) -> list[list[int]]:
        """The reward model's input ids of each row: prompt ids then response ids, padding removed."""
        P = batch.prompt_len
        rows = []
        for ids, mask in zip(batch.input_ids, batch.attention_mask):
            prompt, response = ids[:P][mask[:P]].tolist(), ids[P:][mask[P:]].tolist()
            if self.shares_tokenizer:
                rows.append(prompt + response)
                continue
            p_text, r_text, finished = decode_pair(self.policy_tokenizer, prompt, response)
            rows.append(pair_ids(self.rm_tokenizer, p_text, r_text, chat=False, finished=finished)[0])
        return rows

    def _call_function(self, prompts: list[str], responses: list[str], fields: dict[str, list]) -> torch.Tensor:
        """The function's scores, over the calls and at the concurrency reward.samples_per_call and
        reward.concurrency set (``rlhf_ray/reward_calls.py``), each call with its samples' values of
        ``fields``; an ``async def`` function is awaited."""
        r = self.spec.reward
        what = f"reward function {r.function}"
        values = score_in_calls(with_named_errors(self.fn, what), prompts, responses,  # type: ignore[arg-type]
                                fields=fields, samples_per_call=r.samples_per_call, concurrency=r.concurrency,
                                timeout_s=r.function_timeout_s, what=what)
        name = r.function
        try:
            out = torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"reward function {name} returned a non-number: {exc}") from None
        return out

    def _run_model(self, rows: list[list[int]]) -> torch.Tensor:
        """(len(rows),) float32 scores of token-id rows, in micro-batches left-padded with ``pad_id``."""
        out = []
        for part in plan_passes(len(rows), max_rows=self.micro_batch_size):
            chunk = [rows[i] for i in part]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[j, width - len(r):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            # Positions count real tokens only, so a left-padded row scores as it would alone
            # (RoPE models are shift-invariant anyway; absolute-position models are not).
            out.append(pooled_scores(self.model, self.head, ids, mask, positions_from_mask(mask))[:, 0].float().cpu())
        return torch.cat(out)
