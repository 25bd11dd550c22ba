"""A test environment: every episode has three policy turns; the first two are answered with a
fixed observation (a stand-in for a tool's output) and a turn reward of 0.25, the third ends it."""

from rlhf_ray.envs.base import StepResult


class ThreeTurns:
    def __init__(self, observation: str = " result: 42.") -> None:
        self.observation = observation

    def reset(self, record):
        self.turns = 0
        self.record = record

    def step(self, text):
        self.turns += 1
        if self.turns >= 3:
            return StepResult(done=True)
        return StepResult(self.observation, reward=0.25, info={"tool_calls": 1})
