"""Export a checkpoint's policy as a standard Hugging Face model (loadable by transformers and vLLM).

    python -m rlhf_ray.export runs/demo_cpu-<time>/checkpoints/iter_000150 exported/demo-policy
    python -m rlhf_ray.export runs/demo_cpu-<time> exported/demo-policy   # latest checkpoint of a run

Copies the model weights, config, generation config and tokenizer; leaves out the value head
(``--with-value-head`` keeps it, for continuing PPO from the export). Loads the result once with
``AutoModelForCausalLM`` to check it before reporting success.
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


def export(source: str, out_dir: str, with_value_head: bool = False) -> str:
    policy = find_policy_dir(source)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir!r} exists and is not empty; choose a new directory.")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(policy):
        if name == "value_head.safetensors" and not with_value_head:
            continue
        src = os.path.join(policy, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out_dir, name))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out_dir)
    AutoTokenizer.from_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint directory (iter_NNNNNN) or run directory")
    parser.add_argument("out_dir", help="new directory for the Hugging Face model")
    parser.add_argument("--with-value-head", action="store_true", help="also copy value_head.safetensors")
    args = parser.parse_args(argv)
    try:
        out = export(args.source, args.out_dir, args.with_value_head)
    except (FileNotFoundError, FileExistsError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"exported policy to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
