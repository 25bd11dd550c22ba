"""What every Ray stage needs, the PPO run and the supervised (SFT, reward-model) stages alike:
the cluster (``cluster.py``: start or attach, namespace, addresses, the actors' environment;
``local_cluster.py``: cleaning up after a killed driver), placement groups (``placement.py``),
calls that wait with a timeout and name the failing role and rank (``pending.py``), the handles
on the running roles (``groups.py``), the metrics sink (``metrics.py``: JSONL, TensorBoard, Ray
gauges; ``wandb_log.py``: Weights & Biases) and the quieter terminal (``quiet.py``).

It imports the layers below it (config, backends, workers) and never ``rlhf_ray.coordinator``.
"""
