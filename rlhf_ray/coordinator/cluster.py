"""The Ray cluster a run uses: attach to one, or start a local one that listens on loopback."""

from __future__ import annotations


def start_ray(address: str | None) -> dict:
    """Attach to ``address`` or start a local cluster whose dashboard listens on 127.0.0.1 only.
    Returns where to watch: the dashboard URL and this node's Prometheus metrics endpoint."""
    import ray

    if not ray.is_initialized():
        env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        else:
            # The dashboard (an HTTP API that can submit jobs) listens on loopback only.
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env,
                     log_to_driver=True)
    ctx = ray.get_runtime_context()
    node = next((n for n in ray.nodes() if n["NodeID"] == ctx.get_node_id()), {})
    where = {"dashboard": None, "metrics": None}
    try:
        from ray._private.worker import global_worker

        url = global_worker.node.address_info.get("webui_url")
        where["dashboard"] = f"http://{url}" if url else None
    except Exception:  # attached clients may not know the dashboard address
        pass
    if node.get("MetricsExportPort"):
        where["metrics"] = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    print(f"Ray dashboard: {where['dashboard'] or 'not available'}; Prometheus metrics (rlhf_*): "
          f"{where['metrics'] or 'not available'}")
    return where
