"""The seams to the frameworks: written contracts and their implementations.

    engine.py      TrainEngine, the training-engine contract (learner.backend), and what every engine shares
    deepspeed.py   DeepSpeed ZeRO behind it
    fsdp2.py       PyTorch FSDP2 behind it
    replicated.py  the float32 value head trained beside any engine
    rollout.py     RolloutBackend, the rollout-engine contract (rollout.backend), and its spec
    vllm.py        vLLM behind it

A framework's API is imported only in its own file (tests/unit/test_layers.py).
"""
