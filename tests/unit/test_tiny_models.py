"""Tests for rlhf_ray.tiny_models: offline tiny Llama/Qwen2 + BPE tokenizer builder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from rlhf_ray.tiny_models import (
    SPEC_FILE,
    build_tiny_model,
    build_tokenizer,
    count_parameters,
    ensure_tiny_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SENTENCE = "Ann has 123 apples; 4 plus 5 is 9."


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """One llama and one qwen2 causal LM, built once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": build_tiny_model(root / "llama", arch="llama"),
        "qwen2": build_tiny_model(root / "qwen2", arch="qwen2"),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loads_with_auto_classes_and_ids_agree(built, arch):
    path = built[arch]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    gen = GenerationConfig.from_pretrained(path)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    cfg = model.config
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert gen.eos_token_id == tok.eos_token_id
    assert tok.padding_side == "left"
    assert len(tok) == cfg.vocab_size == 512
    assert cfg.tie_word_embeddings is False
    assert cfg.attention_dropout == 0.0
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert head_dim == 32  # vLLM CPU attention minimum
    assert (cfg.hidden_size, cfg.num_attention_heads) == {"llama": (64, 2), "qwen2": (128, 4)}[arch]
    if arch == "llama":
        assert cfg.head_dim == 32


def test_tokenizer_round_trip_and_left_padding(built):
    tok = AutoTokenizer.from_pretrained(built["llama"])
    ids = tok(SENTENCE)["input_ids"]
    assert tok.decode(ids) == SENTENCE
    assert tok.unk_token_id not in ids
    assert len(ids) < len(SENTENCE) / 2  # merges learned: far fewer tokens than bytes
    batch = tok(["7", SENTENCE], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tok.pad_token_id  # pad on the left
    assert batch["attention_mask"][0].tolist()[-1] == 1
    assert batch["attention_mask"][0].sum().item() == len(tok("7")["input_ids"])


def test_tokenizer_deterministic_for_seed():
    a, b = build_tokenizer(seed=0), build_tokenizer(seed=0)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert build_tokenizer(seed=0, vocab_size=300).get_vocab() != a.get_vocab()


def test_model_determinism_by_seed(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    sd_a, sd_b, sd_c = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert sd_a.keys() == sd_b.keys() == sd_c.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    differing = [k for k in sd_a if not torch.equal(sd_a[k], sd_c[k])]
    assert "model.embed_tokens.weight" in differing and "lm_head.weight" in differing
    # The vocabulary depends on tokenizer_seed only, so policy and reward share it.
    assert (a / "tokenizer.json").read_text() == (c / "tokenizer.json").read_text()


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_ensure_is_idempotent_and_rebuilds_on_spec_change(tmp_path):
    out = tmp_path / "m"
    ensure_tiny_model(out, seed=1)
    weights = out / "model.safetensors"
    first_mtime = weights.stat().st_mtime_ns
    first = load_file(str(weights))
    ensure_tiny_model(out, seed=1)
    assert weights.stat().st_mtime_ns == first_mtime  # not rebuilt

    ensure_tiny_model(out, seed=2)
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["seed"] == 2
    second = load_file(str(out / "model.safetensors"))
    assert not torch.equal(first["lm_head.weight"], second["lm_head.weight"])

    ensure_tiny_model(out, seed=2, num_layers=1)
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.") and p.is_dir()]
    assert leftovers == []  # no temp build or old copy left behind


def test_ensure_rebuilds_incomplete_directory(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a half-written model without a spec file
    ensure_tiny_model(out)
    assert (out / SPEC_FILE).is_file()
    assert AutoConfig.from_pretrained(out).model_type == "llama"


def test_invalid_head_dim_fails_fast(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model(tmp_path / "bad", hidden_size=64, num_heads=4)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reward_kind_gives_one_scalar_per_sequence(tmp_path, arch):
    path = build_tiny_model(tmp_path / "rm", arch=arch, kind="reward", seed=5)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    batch = tok(["1 plus 1 is 2.", SENTENCE, "Count: 3 4 5"], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**batch).logits
    assert scores.shape == (3, 1)
    assert torch.isfinite(scores).all()
    # Left padding: the score of a padded sequence equals its unpadded score.
    with torch.no_grad():
        alone = model(**tok(["1 plus 1 is 2."], return_tensors="pt")).logits
    torch.testing.assert_close(scores[0], alone[0], atol=1e-5, rtol=1e-5)


def test_cli_builds_and_prints_parameter_count(tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "rlhf_ray.tiny_models", "--out", str(out), "--layers", "1", "--seed", "7"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    n_params = count_parameters(out)
    assert line == f"{out.resolve()} parameters={n_params}"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert n_params == sum(p.numel() for p in model.parameters())
    # hidden 64, vocab 512, 1 layer: embed + lm_head 2*512*64, attn 4*64*64, mlp 3*64*256, 3 norms.
    assert n_params == 2 * 512 * 64 + 4 * 64 * 64 + 3 * 64 * 256 + 3 * 64
