"""The PPO driver: the run's lifecycle (``run.py``), one iteration as timed phases (``loop.py``),
advantages through the estimator table (``advantages.py``), recovery from a failed role
(``recovery.py``), checkpoints, the checks before Ray starts (``preflight.py``), the run's
records and summary (``records.py``), the gold check and evaluation samples, rollout dumps, the
start-up clock and the plot. The Ray plumbing it drives the roles through is ``rlhf_ray.runtime``.
"""
