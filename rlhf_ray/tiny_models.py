"""Build tiny random-init Llama / Qwen2 models and a matching BPE tokenizer, offline.

What it does: trains a byte-level BPE tokenizer (``tokenizers`` library) on
deterministic generated English/arithmetic text, builds a randomly initialised
``*ForCausalLM`` (or ``*ForSequenceClassification`` reward model with one label) from
a config, and saves both with ``save_pretrained`` (safetensors), so transformers
(``AutoModelForCausalLM`` / ``AutoTokenizer`` under ``HF_HUB_OFFLINE=1``) and vLLM
load the directory unchanged. Nothing is downloaded.

What it leaves out: no pretraining (the weights are random), no chat template, and
the tokenizer adds no special tokens on encode (callers add ``<s>`` if they want it).

Defaults chosen for vLLM's CPU attention, which needs head_dim >= 32:
Llama hidden 64, 2 heads, explicit head_dim 32 (~197k parameters); Qwen2 hidden 128,
4 heads (~657k; vLLM's Qwen2 ignores ``head_dim`` and uses hidden / heads). Word embeddings
are untied for both, so each policy parameter maps to exactly one engine tensor during
weight sync. Dropout is 0. The tokenizer depends only on ``tokenizer_seed`` (default
0), not on the model ``seed``, so a policy and a reward model built with different
seeds share one vocabulary.

Builds are atomic (a temp directory beside the target, renamed into place, with the
spec file ``rlhf_tiny_spec.json`` written last) and serialised by a sibling lock file
``.<name>.lock``. The CLI is idempotent like ``ensure_tiny_model``: it rebuilds only
when the directory's spec differs (``--force`` always rebuilds). It prints
``<path> parameters=<count>``.

Run (from the repository root):
    python -m rlhf_ray.tiny_models --out /tmp/tiny-llama --arch llama --kind causal_lm --seed 0
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

SPEC_FILE = "rlhf_tiny_spec.json"
# Bump when the builder's output changes for the same arguments: cached models rebuild.
BUILDER_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
MIN_HEAD_DIM = 32  # vLLM CPU attention: "Unsupported CPU attention configuration" below

_ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, 64),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, 128),
}
_KINDS = ("causal_lm", "reward")

_NAMES = ["Ann", "Bob", "the cat", "a dog", "my friend", "the teacher", "Tom", "Mia"]
_VERBS = ["likes", "sees", "has", "wants", "finds", "reads", "makes", "counts"]
_OBJECTS = ["apples", "a book", "the ball", "two birds", "red hats", "a big box", "water"]
_PLACES = ["at home", "in the park", "at school", "by the river", "on the hill", "today"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _sentence(rng: random.Random) -> str:
    """One line of generated text: a sentence, a sum, a count or a question/answer."""
    kind = rng.randrange(5)
    a, b = rng.randrange(10), rng.randrange(10)
    if kind == 0:
        subject, verb = rng.choice(_NAMES).capitalize(), rng.choice(_VERBS)
        return f"{subject} {verb} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
    if kind == 1:
        return f"{a} plus {b} is {a + b}."
    if kind == 2:
        return f"Q: what is {a} plus {b}? A: {a + b}"
    if kind == 3:
        n = rng.randrange(1000)
        subject = rng.choice(_NAMES).capitalize()
        return f"{subject} has {n} {rng.choice(_OBJECTS)}, {_NUMBER_WORDS[a]} and {b}."
    start = rng.randrange(90)
    return "Count: " + " ".join(str(start + i) for i in range(rng.randrange(3, 8)))


def training_text(seed: int = 0, lines: int = 4000) -> list[str]:
    """Deterministic corpus for the tokenizer: ``lines`` generated lines for ``seed``."""
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(lines)]


def build_tokenizer(seed: int = 0, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``vocab_size`` entries (256 bytes + 4 specials + merges).

    Special tokens: ``<pad>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<unk>`` 3.
    Left padding. Deterministic for a seed (same corpus, same merges).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        minimum = len(alphabet) + len(SPECIAL_TOKENS)
        raise ValueError(f"vocab_size must be >= {minimum} (bytes + specials), got {vocab_size}")
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    core.train_from_iterator(training_text(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",  # set in the constructor: assigning it later was not saved
    )


def _resolve_spec(
    arch: str,
    kind: str,
    seed: int,
    hidden_size: int | None,
    num_layers: int,
    num_heads: int | None,
    vocab_size: int,
    max_position_embeddings: int,
    tokenizer_seed: int,
) -> dict:
    """Validate arguments and fill defaults; the result is what the spec file records."""
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    hidden = hidden_size if hidden_size is not None else _ARCHS[arch][3]
    heads = num_heads if num_heads is not None else max(1, hidden // MIN_HEAD_DIM)
    if hidden % heads != 0:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
    if hidden // heads < MIN_HEAD_DIM:
        raise ValueError(
            f"head_dim = hidden_size / num_heads = {hidden // heads} < {MIN_HEAD_DIM}: vLLM's CPU "
            f"attention rejects it; use fewer heads (--heads) or a larger --hidden-size"
        )
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return {
        "builder_version": BUILDER_VERSION,
        "arch": arch,
        "kind": kind,
        "seed": seed,
        "hidden_size": hidden,
        "num_layers": num_layers,
        "num_heads": heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "tokenizer_seed": tokenizer_seed,
    }


def _make_config(spec: dict, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    config_cls = _ARCHS[spec["arch"]][0]
    hidden, heads = spec["hidden_size"], spec["num_heads"]
    kwargs = dict(
        vocab_size=spec["vocab_size"],
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=spec["max_position_embeddings"],
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec["arch"] == "llama":
        kwargs["head_dim"] = hidden // heads
    if spec["kind"] == "reward":
        kwargs["num_labels"] = 1
    return config_cls(**kwargs)


def _write_model(spec: dict, out: Path) -> None:
    """Build tokenizer + random model for ``spec`` and save everything into ``out``."""
    tokenizer = build_tokenizer(seed=spec["tokenizer_seed"], vocab_size=spec["vocab_size"])
    tokenizer.model_max_length = spec["max_position_embeddings"]
    if len(tokenizer) != spec["vocab_size"]:
        # BPE stops early when the corpus has no more pairs seen twice.
        raise ValueError(
            f"the tokenizer reached {len(tokenizer)} tokens, not vocab_size "
            f"{spec['vocab_size']}: the corpus has too few repeated pairs; use a smaller --vocab-size"
        )
    config = _make_config(spec, tokenizer)
    _, lm_cls, reward_cls, _ = _ARCHS[spec["arch"]]
    model_cls = reward_cls if spec["kind"] == "reward" else lm_cls
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(spec["seed"])
        model: PreTrainedModel = model_cls(config)
    model = model.to(torch.float32).eval()
    if spec["kind"] == "causal_lm":
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # The spec is written last: its presence marks a complete build.
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Exclusive lock on a sibling file, so concurrent builders of ``out`` take turns."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_spec(out: Path) -> dict | None:
    try:
        return json.loads((out / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None


def _build_atomically(spec: dict, out: Path) -> None:
    """Build in a temp dir beside ``out``, then swap it in with renames."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; the model dir is meant to be shared
        _write_model(spec, tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    kind: str = "causal_lm",
    seed: int = 0,
    hidden_size: int | None = None,
    num_layers: int = 2,
    num_heads: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    tokenizer_seed: int = 0,
    rebuild: bool = True,
) -> Path:
    """Build a tiny model + tokenizer in ``out_dir``, replacing what is there (``rebuild``) or
    only where ``out_dir`` holds no complete build of this same spec (``rebuild=False``).

    arch: "llama" | "qwen2"; kind: "causal_lm" | "reward" (``*ForSequenceClassification``,
    num_labels=1, one scalar per sequence). ``seed`` fixes the weights (the global
    RNG is left untouched); ``tokenizer_seed`` fixes the vocabulary. Returns the path.
    Safe to call from several processes at once (they serialise on a lock file).
    """
    out = Path(out_dir).resolve()
    spec = _resolve_spec(arch, kind, seed, hidden_size, num_layers, num_heads, vocab_size,
                         max_position_embeddings, tokenizer_seed)
    with _locked(out):
        if rebuild or _read_spec(out) != spec:
            _build_atomically(spec, out)
    return out


def ensure_tiny_model(out_dir: str | Path, **spec: Any) -> Path:
    """``build_tiny_model`` (same keyword arguments) that is idempotent: it rebuilds only if
    ``out_dir`` has no complete build or its recorded spec differs from this one."""
    return build_tiny_model(out_dir, rebuild=False, **spec)


def count_parameters(model_dir: str | Path) -> int:
    """Number of parameters stored in the safetensors files of ``model_dir``."""
    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                numel = 1
                for dim in handle.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    return total


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--arch", default="llama", choices=sorted(_ARCHS))
    parser.add_argument("--kind", default="causal_lm", choices=_KINDS)
    parser.add_argument("--seed", type=int, default=0, help="weight init seed")
    parser.add_argument("--hidden-size", type=int, default=None, help="llama 64, qwen2 128")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=None, help="default: hidden_size // 32")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--max-positions", type=int, default=512)
    parser.add_argument("--force", action="store_true", help="rebuild even if the spec matches")
    args = parser.parse_args(argv)
    kwargs = dict(arch=args.arch, kind=args.kind, seed=args.seed, hidden_size=args.hidden_size,
                  num_layers=args.layers, num_heads=args.heads, vocab_size=args.vocab_size,
                  max_position_embeddings=args.max_positions)
    build = build_tiny_model if args.force else ensure_tiny_model
    path = build(args.out, **kwargs)
    print(f"{path} parameters={count_parameters(path)}")


if __name__ == "__main__":
    main()
