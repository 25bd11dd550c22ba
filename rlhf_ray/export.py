"""Export a checkpoint's policy as a standard Hugging Face model (loadable by transformers and vLLM).

    python -m rlhf_ray.export runs/demo_cpu-<time>/checkpoints/iter_000150 exported/demo-policy
    python -m rlhf_ray.export runs/demo_cpu-<time> exported/demo-policy   # latest checkpoint of a run

Copies the model weights, config, generation config and tokenizer; leaves out the value head
(``--with-value-head`` keeps it, for continuing PPO from the export). Loads the result once with
``AutoModelForCausalLM`` to check it before reporting success.

A LoRA run (``--model.lora.rank``) saves the policy merged (``W + (alpha / r) B A``, what the
default export copies) and the adapter alone in ``policy/adapter/``. ``--adapter-only`` exports that
adapter (``adapter_model.safetensors``, ``adapter_config.json``) with the tokenizer, and checks it by
loading it with PEFT onto its base model (``base_model_name_or_path``, the run's model.path):

    python -m rlhf_ray.export runs/demo_lora_cpu-<time> exported/demo-adapter --adapter-only
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from rlhf_ray.checkpoint_files import complete_checkpoints


def find_policy_dir(source: str) -> str:
    """The ``policy/`` directory of a checkpoint (or of a run's latest complete checkpoint)."""
    if os.path.isfile(os.path.join(source, "COMPLETE")):
        checkpoint = source
    else:
        found = complete_checkpoints(source)
        if not found:
            raise FileNotFoundError(f"{source!r} is neither a complete checkpoint nor a run directory with one.")
        checkpoint = found[-1]
    policy = os.path.join(checkpoint, "policy")
    if not os.path.isfile(os.path.join(policy, "config.json")):
        raise FileNotFoundError(f"{checkpoint!r} has no Hugging Face policy (it was saved with "
                                "--checkpoint.save_hf_policy false); re-save with it enabled.")
    return policy


ADAPTER_SUBDIR = "adapter"  # = rlhf_ray.models.lora.ADAPTER_SUBDIR (not imported: this stays light)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


def export(source: str, out_dir: str, with_value_head: bool = False, adapter_only: bool = False) -> str:
    policy = find_policy_dir(source)
    adapter = os.path.join(policy, ADAPTER_SUBDIR)
    if adapter_only and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"{policy!r} holds no LoRA adapter: the run trained every weight "
                                "(--model.lora.rank 0); export the full model without --adapter-only.")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir!r} exists and is not empty; choose a new directory.")
    os.makedirs(out_dir, exist_ok=True)
    copies = [(policy, n) for n in os.listdir(policy)
              if not adapter_only or n in TOKENIZER_FILES]
    if adapter_only:
        copies += [(adapter, n) for n in os.listdir(adapter)]
    for folder, name in copies:
        if name == "value_head.safetensors" and not with_value_head:
            continue
        src = os.path.join(folder, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out_dir, name))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter_only:
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(out_dir).base_model_name_or_path
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)
    else:
        AutoModelForCausalLM.from_pretrained(out_dir)
    AutoTokenizer.from_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint directory (iter_NNNNNN) or run directory")
    parser.add_argument("out_dir", help="new directory for the Hugging Face model")
    parser.add_argument("--with-value-head", action="store_true", help="also copy value_head.safetensors")
    parser.add_argument("--adapter-only", action="store_true",
                        help="LoRA runs: export the adapter alone (PEFT format) instead of the merged model")
    args = parser.parse_args(argv)
    try:
        out = export(args.source, args.out_dir, args.with_value_head, args.adapter_only)
    except (FileNotFoundError, FileExistsError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"exported policy to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
