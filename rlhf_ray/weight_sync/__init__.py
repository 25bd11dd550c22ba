"""Weight sync learner -> rollout engines: a pure plan plus two transports."""
