"""Run a short PPO job on a two-node local Ray cluster (two raylets on this machine), with the
rollout engine pinned to node A and the learner ranks to node B. Prints one JSON line with the
summary and the node of each role. Run as a separate process by test_multinode.py, since a
process can hold only one Ray connection."""

from __future__ import annotations

import json
import sys
import tempfile

from ray.cluster_utils import Cluster


def main(model: str, run_dir: str) -> None:
    import ray

    from rlhf_ray.coordinator.run import run
    from tests.integration.conftest import small_config

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 4}, "include_dashboard": False,
        "temp_dir": tempfile.mkdtemp(prefix="rm", dir="/tmp")})
    cluster.add_node(num_cpus=2, resources={"node_b": 4})
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = small_config(model, **{
        "ppo.iterations": 2, "sync.transport": sys.argv[3] if len(sys.argv) > 3 else "collective",
        "resources.rollout.custom": "{node_a: 1}", "resources.learner.custom": "{node_b: 1}"})
    summary = run(cfg, run_dir)
    nodes = {label: info["node_id"] for label, info in summary["placement"].items()}
    with open(f"{run_dir}/metrics.jsonl") as fh:
        mismatch = max(json.loads(line)["logprob_mismatch_max"] for line in fh)
    print("RESULT " + json.dumps({"summary": summary, "nodes": nodes, "mismatch": mismatch,
                                  "node_ids": {n["NodeID"]: n["Resources"] for n in ray.nodes()}}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
