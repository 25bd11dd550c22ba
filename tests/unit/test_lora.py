"""LoRA pieces without a learner: config rules, adapter injection, merging, the export plan.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_lora.py
"""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.config.validate import reference_from_learner

SPEC_ARGS = dict(rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from rlhf_ray.tiny_models import ensure_tiny_model

    return str(ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", seed=0))


def _spec(targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    from rlhf_ray.models.lora import LoraSpec

    return LoraSpec(target_modules=tuple(targets), **SPEC_ARGS)


def _model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ---- config ----------------------------------------------------------------------------


def test_reference_source_follows_lora_unless_asked():
    assert not reference_from_learner(load_config(None, {}))
    assert reference_from_learner(load_config(None, {"model.lora.rank": "8"}))
    assert not reference_from_learner(load_config(None, {"model.lora.rank": "8", "reference.from_learner": "false"}))
    assert not reference_from_learner(load_config(None, {"model.lora.rank": "8", "reference.path": "some/sft"}))


@pytest.mark.parametrize("overrides,needle", [
    ({"model.lora.rank": "8", "model.lora.dropout": "0.05"}, "--model.lora.dropout"),
    ({"model.lora.rank": "-1"}, "--model.lora.rank must be >= 0"),
    ({"model.lora.rank": "8", "model.lora.alpha": "0"}, "--model.lora.alpha"),
    ({"model.lora.rank": "8", "model.lora.target_modules": "[]"}, "--model.lora.target_modules is empty"),
    ({"reference.from_learner": "true"}, "needs LoRA"),
    ({"model.lora.rank": "8", "reference.from_learner": "true", "reference.path": "x"}, "drop one of them"),
])
def test_bad_lora_settings_fail_with_the_flag_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_no_reference_role_is_placed_when_the_learners_compute_it():
    from rlhf_ray.runtime.placement import placement_plan

    assert "reference" in [p.role for p in placement_plan(load_config(None, {}))]
    assert "reference" not in [p.role for p in placement_plan(load_config(None, {"model.lora.rank": "8"}))]


def _config_only_model(directory, tied: bool) -> str:
    """A model directory holding only a Llama config.json (no weights, no tokenizer)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, tie_word_embeddings=tied).save_pretrained(str(directory))
    return str(directory)


def _lora_config(path: str, targets: str, rank: str = "4"):
    return load_config(None, {"model.path": path, "model.lora.rank": rank, "model.lora.target_modules": targets})


def test_lm_head_adapter_on_a_tied_model_is_refused_before_anything_starts(tmp_path):
    from rlhf_ray.coordinator.preflight import prepare_inputs

    path = _config_only_model(tmp_path, tied=True)
    # Refused from config.json alone: the directory has no weights and no tokenizer.
    with pytest.raises(ValueError, match=r"includes lm_head, but the policy .* ties its output layer to its input "
                                         r"embeddings .* Drop lm_head from --model.lora.target_modules"):
        prepare_inputs(_lora_config(path, "[q_proj, lm_head]"))


@pytest.mark.parametrize("tied, targets, rank", [
    (True, "[q_proj, v_proj]", "4"),  # the head is not adapted
    (False, "[q_proj, lm_head]", "4"),  # an untied head is a weight of its own in vLLM too
    (True, "[q_proj, lm_head]", "0"),  # no LoRA: a full sync sends the tied embedding itself
])
def test_lora_targets_that_reach_the_engines_pass(tmp_path, tied, targets, rank):
    from rlhf_ray.coordinator.preflight import check_lora_targets

    check_lora_targets(_lora_config(_config_only_model(tmp_path, tied), targets, rank))


def test_ties_output_layer_reads_the_config():
    from transformers import LlamaConfig

    from rlhf_ray.models.lora import ties_output_layer, tied_head_error

    assert ties_output_layer(LlamaConfig(tie_word_embeddings=True))
    assert not ties_output_layer(LlamaConfig(tie_word_embeddings=False))
    assert tied_head_error(("lm_head",), LlamaConfig(tie_word_embeddings=False), "m") is None
    assert "ties its output layer" in tied_head_error(("lm_head",), LlamaConfig(tie_word_embeddings=True), "m")


# ---- adapters --------------------------------------------------------------------------


def test_missing_target_modules_are_a_clear_error(tiny_model):
    from rlhf_ray.models.lora import add_lora

    with pytest.raises(ValueError, match=r"no linear layer named \['c_attn'\].*q_proj"):
        add_lora(_model(tiny_model), _spec(("q_proj", "c_attn")))


def test_adapters_off_is_the_base_model_and_merge_is_peft_merge(tiny_model):
    from rlhf_ray.models.lora import adapters_disabled, add_lora, lora_layers, merged_params

    base = _model(tiny_model)
    model = add_lora(_model(tiny_model), _spec())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # B starts at 0: move it so the adapters change the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(4, 500, (2, 9), generator=g)
    with torch.no_grad():
        want = base(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        with adapters_disabled(model):
            off = model(input_ids=ids).logits
        merged = {name: m.value() for name, m in merged_params(model).items()}
        for layer in lora_layers(model).values():
            layer.merge()  # PEFT's own merge, in place
        peft_merged = {name: m.base.detach().clone() for name, m in merged_params(model).items()}
    assert float((adapted - want).abs().max()) > 1e-3
    assert torch.equal(off, want)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # back on after the block
    assert merged.keys() == peft_merged.keys() and len(merged) == 7 * 2  # 7 projections x 2 layers
    assert max(float((merged[k] - peft_merged[k]).abs().max()) for k in merged) < 1e-6


def test_sync_plan_is_the_adapted_layers_plus_fused_siblings(tiny_model):
    from rlhf_ray.models import ActorCritic
    from rlhf_ray.models.actor_critic import POLICY_PREFIX
    from rlhf_ray.models.export import export_plan, policy_state_dict

    ac = ActorCritic.from_pretrained(tiny_model, lora=_spec(("q_proj", "up_proj")))
    plan = export_plan(ac.policy, POLICY_PREFIX, changed_only=True)
    assert sorted(n.split(".", 3)[3] for n in plan.merged) == ["mlp.up_proj.weight"] * 2 + \
        ["self_attn.q_proj.weight"] * 2
    # vLLM fuses q/k/v (Qwen2: with biases) and gate/up: the unchanged pieces travel with the changed ones
    plain = sorted({hf.split(".", 3)[3] for _, hf in plan.plain})
    assert plain == ["mlp.gate_proj.weight", "self_attn.k_proj.bias", "self_attn.k_proj.weight",
                     "self_attn.q_proj.bias", "self_attn.v_proj.bias", "self_attn.v_proj.weight"]
    full = policy_state_dict(ac)
    assert list(full) == list(_model(tiny_model).state_dict())  # merged export = an HF checkpoint's names


def test_the_export_plan_says_whether_a_sync_leaves_layers_out(tiny_model):
    """A full model's plan is complete (engines then report every layer they did not get); a
    LoRA sync plan (changed layers only) is not."""
    from rlhf_ray.models import ActorCritic
    from rlhf_ray.models.actor_critic import POLICY_PREFIX
    from rlhf_ray.models.export import export_plan

    full = ActorCritic.from_pretrained(tiny_model)
    assert export_plan(full.policy, POLICY_PREFIX, changed_only=True).complete
    lora = ActorCritic.from_pretrained(tiny_model, lora=_spec(("q_proj",)))
    assert not export_plan(lora.policy, POLICY_PREFIX, changed_only=True).complete
    assert not export_plan(lora.policy, POLICY_PREFIX).complete  # merged layers
