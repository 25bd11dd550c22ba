"""Framework specifics: DeepSpeed (learner) and vLLM (rollout)."""
