"""Bad input fails fast with a message that says what, why and how to fix; never a hang."""

from __future__ import annotations

import pytest

from tests.integration.conftest import small_config

pytestmark = pytest.mark.integration


def test_reward_function_with_wrong_length_fails_before_ray(tiny_llama, tmp_path):
    from rlhf_ray.coordinator.preflight import prepare_inputs

    fn = tmp_path / "bad_reward.py"
    fn.write_text("def score(prompts, responses):\n    return [1.0]\n"
                  "def boom(prompts, responses):\n    raise KeyError('label')\n")
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses on a probe call"):
        prepare_inputs(small_config(tiny_llama, **{"reward.function": f"{fn}:score"}))
    with pytest.raises(ValueError, match="raised KeyError on a probe call"):
        prepare_inputs(small_config(tiny_llama, **{"reward.function": f"{fn}:boom"}))


def test_reward_function_failing_mid_run_names_role_and_phase(ray_cluster, tiny_llama, tmp_path):
    from rlhf_ray.coordinator.run import run
    from rlhf_ray.runtime.pending import RemoteCallError

    fn = tmp_path / "bad_reward.py"
    fn.write_text("def score(prompts, responses):\n    return [1.0] * min(len(responses), 2)\n")
    cfg = small_config(tiny_llama, **{"reward.function": f"{fn}:score", "ppo.iterations": 1})
    with pytest.raises(RemoteCallError) as info:
        run(cfg, str(tmp_path / "run"))
    msg = str(info.value)
    assert info.value.kind == "error" and info.value.source == ("reward", 0)
    assert "[phase score]" in msg and "returned 2 scores for 16 responses" in msg


def test_roles_that_do_not_fit_fail_before_any_actor_starts(ray_cluster, tiny_llama, tmp_path):
    from rlhf_ray.coordinator.run import run
    from rlhf_ray.runtime.placement import PlacementError

    cfg = small_config(tiny_llama, **{"resources.learner.num_cpus": 3})
    with pytest.raises(PlacementError, match=r"CPU: plan needs 7, cluster has 4"):
        run(cfg, str(tmp_path / "run"))
    assert not ray_cluster.util.placement_group_table()  or all(
        pg["state"] == "REMOVED" for pg in ray_cluster.util.placement_group_table().values())


def test_missing_reward_function_file_fails_before_ray(tiny_llama, tmp_path):
    from rlhf_ray.coordinator.preflight import prepare_inputs

    cfg = small_config(tiny_llama, **{"reward.function": str(tmp_path / "nope.py") + ":score"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_inputs(cfg)


def test_prompts_longer_than_the_limit(tiny_llama, tmp_path):
    from rlhf_ray.coordinator.preflight import prepare_inputs

    long_prompts = tmp_path / "p.jsonl"
    long_prompts.write_text('{"prompt": "' + "one two three " * 40 + '"}\n{"prompt": "short"}\n')
    cfg = small_config(tiny_llama, **{"data.prompts": str(long_prompts), "data.max_prompt_tokens": 16,
                                      "data.too_long": "error"})
    with pytest.raises(ValueError, match="more than --data.max_prompt_tokens 16"):
        prepare_inputs(cfg)
    cfg = small_config(tiny_llama, **{"data.prompts": str(long_prompts), "data.max_prompt_tokens": 16,
                                      "data.too_long": "drop", "rollout.prompts_per_iteration": 1,
                                      "learner.num_ranks": 1, "learner.micro_batch_size": 1})
    inputs = prepare_inputs(cfg)
    assert inputs.prompts.dropped == 1 and len(inputs.prompts.token_ids) == 1


def test_missing_model_directory(tmp_path):
    from rlhf_ray.coordinator.preflight import prepare_inputs

    cfg = small_config(str(tmp_path / "no-model"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prepare_inputs(cfg)


def test_reward_endpoint_down_fails_before_ray(tiny_llama):
    import socket

    from rlhf_ray.coordinator.preflight import prepare_inputs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = small_config(tiny_llama, **{"reward.kind": "http", "reward.url": f"http://127.0.0.1:{port}/score",
                                      "reward.http_retries": 1, "reward.function": "none"})
    with pytest.raises(ConnectionError, match="unreachable after 2 attempts"):
        prepare_inputs(cfg)


# PPO with a working reward endpoint: tests/integration/test_ppo_system.py (test_ppo_with_a_reward_endpoint,
# one run with the held-out evaluation test).


def test_tokenizer_without_eos(tiny_llama, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from rlhf_ray.coordinator.preflight import prepare_inputs

    model = tmp_path / "no-eos"
    shutil.copytree(tiny_llama, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.eos_token = None
    tok.save_pretrained(model)
    with pytest.raises(ValueError, match="has no EOS token"):
        prepare_inputs(small_config(str(model)))


def test_hanging_reward_function_fails_the_probe_with_a_timeout(tiny_llama, tmp_path):
    import time

    from rlhf_ray.coordinator.preflight import prepare_inputs

    fn = tmp_path / "hang.py"
    fn.write_text("import time\ndef hang(prompts, responses):\n    time.sleep(600)\n")
    t0 = time.time()
    with pytest.raises(TimeoutError, match="did not return within 2 s on a probe call"):
        prepare_inputs(small_config(tiny_llama, **{"reward.function": f"{fn}:hang", "resources.call_timeout_s": 2}))
    assert time.time() - t0 < 30
