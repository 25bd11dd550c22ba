"""Benchmarks of rlhf_ray: each module is a script run with ``python -m benchmarks.<name>``.

They print a table and save JSON (with an environment snapshot) under ``benchmarks/results/``;
see ``benchmarks/_env.py``. Timings never go in tests.
"""
