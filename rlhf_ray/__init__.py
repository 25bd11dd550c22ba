"""rlhf_ray: distributed PPO for language models on Ray, vLLM and DeepSpeed."""

__version__ = "0.1.0"
