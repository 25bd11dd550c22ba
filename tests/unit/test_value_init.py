"""model.value_init reward_model: the critic starts from the reward model.

In one process (world size 1, gloo on CPU, no Ray), through ``tests/inprocess.py``: the shared
body's value head is the reward model's score head after set-up (with and without LoRA), so its
values are that head applied to the policy's hidden states; a separate critic (ZeRO-3, FSDP2, and
ZeRO-2 with LoRA) is the reward model, body and head, so its value at each sequence's last token is
the reward model's score of the sequence; resuming a checkpoint keeps the checkpoint's head. Before
Ray: a reward model with another hidden size (shared body), another tokenizer (separate critic)
or no score head is refused by the pre-flight, and a reward kind other than model (and the other
contradictions) by config validation.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_value_init.py
"""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import ConfigError
from tests import inprocess as ip

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.distributed\.\w+` is deprecated:FutureWarning")

FP32_TOL = 1e-4  # float32 learner vs a plain forward: summation order only (as in test_learner_inprocess.py)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> str:
    """A tiny Llama reward model (one label) of the policy's hidden size and tokenizer, other weights."""
    from rlhf_ray.tiny_models import ensure_tiny_model

    return str(ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-rm", arch="llama", kind="reward", seed=1))


@pytest.fixture(scope="module")
def rm_weights(reward_model) -> dict[str, torch.Tensor]:
    """The reward model's weights as a plain transformers load gives them."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(reward_model, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _config(policy: str, reward: str, **overrides: object):
    return ip.learner_config(policy, **{"model.value_init": "reward_model", "model.value_head_init_std": 0.0,
                                        "reward.kind": "model", "reward.model_path": reward, **overrides})


@torch.no_grad()
def _rm_scores(reward_model: str, batch) -> torch.Tensor:
    """(B,) the reward model's score of each sequence of ``batch`` (prompt + response), read at its
    last real token as the reward role reads it, with the learner's position ids."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_ray.models.reward_head import pooled_scores, score_head

    model = AutoModelForSequenceClassification.from_pretrained(reward_model, dtype=torch.float32).eval()
    return pooled_scores(model, score_head(model), batch.input_ids, batch.attention_mask.bool(),
                         batch.position_ids)[:, 0]


@torch.no_grad()
def _critic_scores(learner, batch) -> torch.Tensor:
    """(B,) the learner's value at each sequence's last real token: the engine's forward over every
    position (all of them, not only the response's), the value head on its critic hidden states."""
    from rlhf_ray.models.reward_head import last_token_index

    b = batch.to(learner.device)
    out = learner.engine(b.input_ids, b.attention_mask.long(), b.position_ids)
    values = learner.head.module(out.value_hidden)
    last = last_token_index(b.attention_mask)
    return values[torch.arange(len(b)), last].cpu()


@pytest.mark.parametrize("overrides", [{}, {"model.lora.rank": 4, "model.lora.alpha": 8}], ids=["full", "lora"])
def test_shared_body_value_head_starts_as_the_reward_models_score_head(tiny_model, reward_model, rm_weights,
                                                                       overrides):
    learner, _ = ip.build_learner(_config(tiny_model, reward_model, zero_stage=2, **overrides))
    try:
        head = ip.value_head_state(learner)
        assert torch.equal(head["linear.weight"], rm_weights["score.weight"])
        assert torch.equal(head["linear.bias"], torch.zeros(1))  # Llama's score head has no bias
        # its values are the reward model's score head applied to the policy body's hidden states
        batch = ip.synthetic_batch()
        _, values = learner.compute_old(batch)
        _, ref_v = ip.plain_forward(tiny_model, learner.policy_state_dict(), head, batch,
                                    learner.spec.temperature, learner.device)
        assert float(values.abs().max()) > 1e-3
        assert float((values - ref_v).abs().max()) < FP32_TOL
    finally:
        ip.release(learner)


@pytest.mark.parametrize("stage,overrides", [
    (3, {}), (3, {"learner.backend": "fsdp2"}), (2, {"model.lora.rank": 4, "model.lora.alpha": 8})],
    ids=["zero3", "fsdp2-3", "zero2-lora"])
def test_separate_critic_starts_as_the_reward_model(tiny_model, reward_model, rm_weights, checkpoint, stage, overrides):
    from rlhf_ray.backends.engine import gather_full_state_dict

    learner, _ = ip.build_learner(_config(tiny_model, reward_model, zero_stage=stage, separate_critic=True, **overrides))
    try:
        assert ip.max_abs_diff(learner.policy_state_dict(), checkpoint) == 0  # the policy is untouched
        head = ip.value_head_state(learner)
        assert torch.equal(head["linear.weight"], rm_weights["score.weight"])
        if "model.lora.rank" not in overrides:  # the critic's body holds the reward model's body weights
            body = learner.engine.module.critic_body
            got = gather_full_state_dict(learner.engine, body.named_parameters(), keep=True)
            assert got and all(torch.equal(t, rm_weights[f"model.{name}"]) for name, t in got.items())
        batch = ip.synthetic_batch()
        want = _rm_scores(reward_model, batch)
        assert float(want.abs().max()) > 1e-3
        assert float((_critic_scores(learner, batch) - want).abs().max()) < FP32_TOL
    finally:
        ip.release(learner)


def test_resume_keeps_the_checkpoints_value_head(tiny_model, reward_model, rm_weights, tmp_path):
    cfg = _config(tiny_model, reward_model, zero_stage=2)
    learner, _ = ip.build_learner(cfg)
    try:
        ip.train(learner, ip.synthetic_batch(), iteration=0)
        learner.save_checkpoint(str(tmp_path / "ckpt"))
        saved_head = ip.value_head_state(learner)
    finally:
        ip.release(learner)
    assert not torch.equal(saved_head["linear.weight"], rm_weights["score.weight"])  # the update moved it
    resumed, _ = ip.build_learner(cfg)  # set-up starts from the reward model, as every set-up does
    try:
        assert torch.equal(ip.value_head_state(resumed)["linear.weight"], rm_weights["score.weight"])
        resumed.load_checkpoint(str(tmp_path / "ckpt"))
        assert ip.max_abs_diff(ip.value_head_state(resumed), saved_head) == 0
    finally:
        ip.release(resumed)


# --------------------------------------------------------------------------- refused before Ray


@pytest.fixture(scope="module")
def wide_reward_model(tmp_path_factory) -> str:
    """A reward model of hidden size 128 (the policy's is 64), same tokenizer."""
    from rlhf_ray.tiny_models import ensure_tiny_model

    return str(ensure_tiny_model(tmp_path_factory.mktemp("models") / "wide-rm", arch="llama", kind="reward",
                                 hidden_size=128, seed=2))


def test_preflight_refuses_a_reward_model_of_another_hidden_size_with_the_shared_body(tiny_model, wide_reward_model):
    from rlhf_ray.coordinator.preflight import prepare_inputs

    with pytest.raises(ValueError, match=r"hidden states of size 64.*size 128.*--model\.separate_critic true"):
        prepare_inputs(_config(tiny_model, wide_reward_model))


def test_preflight_accepts_a_reward_model_of_another_hidden_size_as_a_separate_critic(tiny_model, wide_reward_model):
    from rlhf_ray.coordinator.preflight import check_value_init

    check_value_init(_config(tiny_model, wide_reward_model, separate_critic=True))  # the critic is the RM itself


def test_preflight_refuses_a_separate_critic_whose_tokenizer_differs(tiny_model, tmp_path):
    from rlhf_ray.coordinator.preflight import check_value_init
    from rlhf_ray.tiny_models import build_tiny_model

    other = str(build_tiny_model(tmp_path / "other-rm", kind="reward", tokenizer_seed=1, vocab_size=400))
    with pytest.raises(ValueError, match="its tokenizer differs from the policy's"):
        check_value_init(_config(tiny_model, other, separate_critic=True))


def test_preflight_refuses_a_reward_model_without_a_score_head(tiny_model):
    from rlhf_ray.coordinator.preflight import check_value_init

    with pytest.raises(ValueError, match=r"has no score head \(score\.weight"):
        check_value_init(_config(tiny_model, tiny_model))  # a causal LM: no score head


@pytest.mark.parametrize("overrides,match", [
    ({"reward.kind": "function", "reward.model_path": None}, r"--reward\.kind is 'function': there is no reward model"),
    ({"reward.kind": "http", "reward.url": "http://127.0.0.1:1/score", "reward.model_path": None},
     r"--reward\.kind is 'http'"),
    ({"ppo.estimator": "rloo", "rollout.samples_per_prompt": 2, "rollout.prompts_per_iteration": 4},
     "a critic-free estimator trains no value network"),
    ({"model.separate_critic": True, "model.critic_path": "/elsewhere"}, r"drop --model\.critic_path"),
    ({"model.value_head_init_std": 0.02}, "the random init would never be used"),
], ids=["function-reward", "http-reward", "critic-free", "critic-path", "init-std"])
def test_config_validation_refuses_value_init_without_a_reward_model_or_a_critic(tiny_model, reward_model,
                                                                                  overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tiny_model, reward_model, **overrides)


def test_the_default_keeps_the_fresh_head_and_the_memory_plan_sizes_the_rm_critic(tiny_model, wide_reward_model):
    from rlhf_ray.backends.memory import ModelShape, role_estimates

    assert ip.learner_config(tiny_model).model.value_init == "policy"
    cfg = _config(tiny_model, wide_reward_model, separate_critic=True, **{"resources.learner.num_gpus": 1})
    read: list[str] = []
    role_estimates(cfg, gpu_bytes=80 * 2**30, read=lambda p: read.append(p) or ModelShape.read(p))
    assert wide_reward_model in read  # the critic the learner will hold is the reward model
