"""vLLM (CPU build) serves the tiny Llama / Qwen2 and agrees with transformers on logprobs.

Builds the tiny model offline, loads it in-process with vLLM, decodes greedily with
``logprobs=0`` (the sampled token's logprob) and recomputes those logprobs with
transformers' log-softmax on the same token sequences, all in float32.
Skipped when vllm is not importable.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

vllm = pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rlhf_ray.tiny_models import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.integration

PROMPTS = ["3 plus 4 is", "Q: what is 2 plus 5? A:", "Ann has 12 apples and", "Count: 41 42"]
NEW_TOKENS = 12
VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: ~2 s to load on CPU
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the CPU build refuses to start without it
    "HF_HUB_OFFLINE": "1",
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_dir(request, tmp_path_factory) -> str:
    """Llama (explicit head_dim 32) and Qwen2 (vLLM derives head_dim = hidden / heads)."""
    arch = request.param
    return str(build_tiny_model(tmp_path_factory.mktemp("vllm") / arch, arch=arch, seed=0))


@pytest.fixture(scope="module")
def greedy_outputs(tiny_dir):
    """(prompt ids, completion ids, vLLM sampled-token logprobs) for each prompt."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in VLLM_ENV.items():
            mp.setenv(key, value)
        llm = vllm.LLM(model=tiny_dir, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
        params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        del llm
        gc.collect()
    results = []
    for ids, out in zip(prompt_ids, outputs):
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        # completion.logprobs: one dict {token_id: Logprob(logprob, rank, decoded_token)}
        # per generated position; logprobs=0 keeps only the sampled token.
        logprobs = [position[tok].logprob for position, tok in zip(completion.logprobs, tokens)]
        results.append((ids, tokens, logprobs))
    return results


def test_vllm_generates_requested_tokens(greedy_outputs):
    for _, tokens, logprobs in greedy_outputs:
        assert len(tokens) == len(logprobs) == NEW_TOKENS
        assert all(0 <= t < 512 for t in tokens)
        assert all(lp <= 0.0 for lp in logprobs)


def test_vllm_logprobs_match_transformers(tiny_dir, greedy_outputs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    worst = 0.0
    for prompt_ids, tokens, vllm_logprobs in greedy_outputs:
        full = torch.tensor([prompt_ids + tokens])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)
        # logits at position i predict token i + 1
        steps = logp[len(prompt_ids) - 1 : -1]
        hf = steps.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(vllm_logprobs), hf, atol=1e-3, rtol=0)
        worst = max(worst, (torch.tensor(vllm_logprobs) - hf).abs().max().item())
        # Greedy: vLLM's token is transformers' argmax, up to float noise between
        # near-tied logits of a random-init model.
        assert (steps.max(-1).values - hf).max().item() < 1e-4
    assert worst < 1e-3
