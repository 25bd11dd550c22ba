"""A reward function that answers like a remote judge: each call waits 50 ms, then scores the
demo task (``rlhf_ray.rewards.digit_fraction``). Used by ``benchmarks/pipeline.py`` as
``reward.function`` (a file path, so the reward actor imports only this file)."""

import time

from rlhf_ray.rewards import digit_fraction

LATENCY_S = 0.05


def judge(prompts, responses):
    time.sleep(LATENCY_S)
    return digit_fraction(prompts, responses)
