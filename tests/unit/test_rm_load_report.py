"""The reward model's start from a causal LM: only an unexpected load mismatch is shown."""


def test_reward_model_load_report_shows_only_what_is_not_the_expected_head_swap():
    from rlhf_ray.supervised.trainer import unexpected_load_keys

    expected = {"missing_keys": ["score.weight"], "unexpected_keys": ["lm_head.weight"], "mismatched_keys": []}
    assert unexpected_load_keys(expected) == {}
    odd = {"missing_keys": ["score.weight", "model.layers.0.mlp.up_proj.weight"],
           "unexpected_keys": ["lm_head.weight", "model.extra"], "mismatched_keys": [("model.norm.weight", 1, 2)]}
    assert unexpected_load_keys(odd) == {"missing_keys": ["model.layers.0.mlp.up_proj.weight"],
                                         "unexpected_keys": ["model.extra"],
                                         "mismatched_keys": ["('model.norm.weight', 1, 2)"]}
