"""LoRA adapters on the actor-critic's bodies, built with PEFT, and what the rest needs from them.

Adapters are injected in place (``peft.inject_adapter_in_model``): ``ActorCritic.policy`` stays
the plain HF ``*ForCausalLM``, and an adapted ``nn.Linear`` at ``model.layers.0.self_attn.q_proj``
becomes a PEFT LoRA layer holding ``q_proj.base_layer.weight`` (frozen W, d_out x d_in),
``q_proj.lora_A.default.weight`` (A, r x d_in) and ``q_proj.lora_B.default.weight`` (B, d_out x r).
Its output is ``x W^T + (alpha / r) x A^T B^T``; B starts at zero, so the adapted model starts
exactly at the base model. Everything else in the body is frozen.

* the reference: :func:`adapters_disabled` runs the base model (W alone) without a second copy.
* the weight sync and exports: :func:`merged_weight` gives ``W + (alpha / r) B A``, the tensor an
  inference engine loads under the HF name ``...q_proj.weight`` (:func:`hf_name`).
* saving the adapter alone: :func:`adapter_state_dict` under PEFT's file-format names, which
  ``peft.PeftModel.from_pretrained(base, dir)`` loads.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

ADAPTER_NAME = "default"
ADAPTER_SUBDIR = "adapter"  # beside a saved policy: the adapter alone, in PEFT's format
BASE_LAYER = ".base_layer"
OUTPUT_LAYER = "lm_head"  # the output layer's module name in Llama/Qwen2-style causal LMs

# vLLM loads these checkpoint tensors into one fused layer (its models' packed_modules_mapping);
# its in-place reload rebuilds a fused layer from the pieces that arrive, so a sync that changes
# one piece sends its siblings too, unchanged.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class LoraSpec:
    """The adapters to add: rank r, alpha (update scaled by alpha / r), dropout, target module names."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @staticmethod
    def of(lora) -> "LoraSpec | None":
        """The adapters a ``model.lora`` config section asks for, or None for full fine-tuning (rank 0)."""
        if lora.rank <= 0:
            return None
        return LoraSpec(lora.rank, lora.alpha, lora.dropout, tuple(lora.target_modules))


def ties_output_layer(model_config) -> bool:
    """Whether a transformers model config ties the output layer (``lm_head``) to the input
    embeddings (``tie_word_embeddings``; in transformers 5 a model's config carries it, or its
    text config does for a multimodal model). Reads the config only, no weights."""
    for config in (model_config, model_config.get_text_config()):
        tied = getattr(config, "tie_word_embeddings", None)
        if tied is not None:
            return bool(tied)
    return False


def tied_head_error(target_modules: Iterable[str], model_config, model_path: str) -> str | None:
    """Why the adapters of ``target_modules`` would not all reach the inference engines, or None.

    A model that ties ``lm_head`` to its input embeddings has no output layer of its own in vLLM:
    vLLM reuses ``embed_tokens`` and skips any ``lm_head.weight`` it is sent, so an adapted
    ``lm_head`` would train in the learner while the engines keep sampling from the base head."""
    if OUTPUT_LAYER not in tuple(target_modules) or not ties_output_layer(model_config):
        return None
    return (f"--model.lora.target_modules includes {OUTPUT_LAYER}, but the policy {model_path!r} ties its output "
            "layer to its input embeddings (tie_word_embeddings in its config.json): vLLM keeps no separate "
            f"{OUTPUT_LAYER} for such a model and skips the {OUTPUT_LAYER} weights a sync sends, so the engines would "
            f"keep sampling from the base model's head. Drop {OUTPUT_LAYER} from --model.lora.target_modules, or "
            "train every weight (--model.lora.rank 0).")


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def add_lora(model: nn.Module, spec: LoraSpec, what: str = "policy") -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything but them; returns ``model``.

    Raises ValueError when a target name matches no ``nn.Linear`` of ``model`` (e.g. GPT-2 names its
    projections c_attn / c_proj, Conv1D layers), naming the linear layers it does have."""
    from peft import LoraConfig, inject_adapter_in_model

    linear = sorted({_leaf(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in spec.target_modules if t not in linear]
    if missing:
        raise ValueError(f"--model.lora.target_modules: the {what} ({type(model).__name__}) has no linear layer "
                         f"named {missing}; its linear layers are {linear}. Set --model.lora.target_modules to "
                         "some of those.")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> PEFT LoRA layer of every adapted layer of ``model``, in module order."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model`` computes its base model (every adapter off); use under no_grad."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def hf_name(name: str) -> str:
    """The HF checkpoint name of a parameter of an adapted model: ``...q_proj.base_layer.weight``
    -> ``...q_proj.weight``; other names unchanged."""
    return name.replace(BASE_LAYER + ".", ".")


def merged_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B A (d_out, d_in) in W's dtype, computed in float32: base (d_out, d_in),
    lora_a (r, d_in), lora_b (d_out, r). A new tensor; the inputs are not changed."""
    delta = lora_b.float() @ lora_a.float()
    return (base.float() + scaling * delta).to(base.dtype)


@dataclass(frozen=True)
class MergedParams:
    """The parameters whose merge is one adapted layer's weight: W, A, B and the scaling."""

    base: nn.Parameter
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    scaling: float

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.base, self.lora_a, self.lora_b]

    def value(self) -> torch.Tensor:
        """The merged weight; under ZeRO-3 call it inside a gather of ``params``."""
        return merged_weight(self.base.data, self.lora_a.data, self.lora_b.data, self.scaling)


def merged_params(model: nn.Module, prefix: str = "") -> dict[str, MergedParams]:
    """HF weight name (``prefix`` removed) -> :class:`MergedParams` of each adapted layer of ``model``."""
    out: dict[str, MergedParams] = {}
    for path, layer in lora_layers(model).items():
        if ADAPTER_NAME not in layer.lora_A:
            continue
        name = f"{path}.weight"
        name = name[len(prefix):] if prefix and name.startswith(prefix) else name
        out[name] = MergedParams(layer.get_base_layer().weight, layer.lora_A[ADAPTER_NAME].weight,
                                 layer.lora_B[ADAPTER_NAME].weight, float(layer.scaling[ADAPTER_NAME]))
    return out


def changed_module_paths(names: list[str]) -> set[str]:
    """Module paths (weight names minus the last part) of ``names`` plus their fused siblings
    (:data:`FUSED_SIBLINGS`): q_proj changed -> k_proj and v_proj go too."""
    modules = {n.rsplit(".", 1)[0] for n in names}
    out = set(modules)
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        for group in FUSED_SIBLINGS:
            if leaf in group:
                out.update(f"{parent}.{sibling}" if parent else sibling for sibling in group)
    return out


def adapter_state_dict(named: Iterable[tuple[str, torch.Tensor]], prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapters among ``named`` (e.g. ``model.named_parameters()``, or gathered full copies)
    under PEFT's saved names (``base_model.model.<path>.lora_A.weight``), detached CPU copies;
    ``prefix`` (e.g. ``policy.``) is removed from the paths first, names without it are skipped."""
    out = {}
    for name, p in named:
        if ".lora_" not in name or not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        out["base_model.model." + name.replace(f".{ADAPTER_NAME}.", ".")] = p.detach().cpu().clone()
    return out


def save_adapter(state: dict[str, torch.Tensor], spec: LoraSpec, out_dir: str | Path,
                 base_model: str | None = None) -> Path:
    """Write an adapter as PEFT does (``adapter_model.safetensors`` + ``adapter_config.json``) in
    ``out_dir``: ``state`` from :func:`adapter_state_dict` (or its gathered equivalent)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_model)
    config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    with open(Path(adapter_dir) / "adapter_config.json") as fh:
        return json.load(fh)
