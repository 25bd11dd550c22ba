"""Names of remote sources in errors (no Ray needed)."""

from rlhf_ray.coordinator.pending import RemoteCallError, describe


def test_describe_names_every_role_and_rank():
    assert describe(("rollout", 2)) == "rollout engine 2"
    assert describe(("learner", 1)) == "learner rank 1"
    assert describe(("sft", 0)) == "sft rank 0"  # supervised trainers use the same calls
    assert describe(("reference", 0)) == "reference" and describe(("reward", 0)) == "reward"


def test_error_message_carries_the_phase():
    exc = RemoteCallError("PPO update: learner rank 1 died", "died", ("learner", 1), "PPO update")
    exc.phase = "update"
    assert str(exc) == "[phase update] PPO update: learner rank 1 died"
