"""The Ray cluster a run uses: attach to one, or start a local one (its dashboard on loopback),
first ending what a killed earlier run left behind (``local_cluster.py``)."""

from __future__ import annotations

import atexit

from rlhf_ray.coordinator.local_cluster import record, reap_orphans


def _remember_local_cluster() -> None:
    """Record the local cluster's processes (for a later start, should this driver be killed);
    forget them at a clean exit, when Ray stops them itself."""
    try:
        from ray._private.worker import global_worker

        node = global_worker.node
        pids = [info.process.pid for infos in node.all_processes.values() for info in infos]
        path = record(pids, node.get_session_dir_path())
    except Exception:  # a Ray internals change costs only the clean-up after a SIGKILL
        return
    atexit.register(lambda: path.unlink(missing_ok=True))


def start_ray(address: str | None) -> dict:
    """Attach to ``address`` or start a local cluster whose dashboard listens on 127.0.0.1 only.
    Returns where to watch: the dashboard URL and this node's Prometheus metrics endpoint."""
    import ray

    if not ray.is_initialized():
        env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        else:
            ended = reap_orphans()
            if ended:
                print(f"ended {len(ended)} process(es) of a local Ray cluster left behind by a run that was killed")
            # The dashboard (an HTTP API that can submit jobs) listens on loopback only.
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env,
                     log_to_driver=True)
            _remember_local_cluster()
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
