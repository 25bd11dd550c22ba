"""The Ray cluster a run uses: attach to one, or start a local one (its dashboard on loopback),
first ending what a killed earlier run left behind (``local_cluster.py``).

The run's actors live in a named Ray namespace (``logging.ray_namespace``, by default the run
directory's name), recorded in ``<run_dir>/ray.json`` and printed at start, so another shell can
reach them: ``ray.init(address=GCS, namespace=NS); ray.util.list_named_actors()`` (both printed),
then ``ray.get_actor(name)``; a replaced actor is ``<role>-<rank>-r<n>``, so look the name up.
"""

from __future__ import annotations

import atexit
import os

from rlhf_ray.runtime.local_cluster import record, reap_orphans
from rlhf_ray.runtime.metrics import EXPORTED_PREFIX


NO_PRESTART = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


_STARTED_LOCAL = False  # this process started the local (single-node) cluster it runs on


def collective_interface(named: str | None) -> str | None:
    """The network interface the gloo/NCCL groups use: the one named in the config, else the
    loopback interface when this process started a local cluster (every actor is on this machine,
    so nothing needs to listen on the network), else None (the libraries choose)."""
    import socket

    if named or not _STARTED_LOCAL:
        return named
    names = {n for _, n in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


def base_env(threads: int, network_interface: str | None = None) -> dict[str, str]:
    """Environment of every role's actor; ``network_interface`` pins gloo's and NCCL's sockets."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if network_interface:
        env.update(GLOO_SOCKET_IFNAME=network_interface, NCCL_SOCKET_IFNAME=network_interface)
    return env


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


def namespace_for(template: str, run_dir: str) -> str:
    """``logging.ray_namespace`` with ``{run}`` filled in by the run directory's name: unique per
    run, so two runs on one cluster never collide on the actor names ``rollout-0``, ..."""
    return template.format(run=os.path.basename(os.path.normpath(run_dir)))


def metrics_urls(node_ip: str, port: int | None) -> tuple[str | None, str | None]:
    """(URL to open on the driver's machine, URL for other machines) of a node's Prometheus
    endpoint. Ray 2.60's metrics agent listens on every interface (0.0.0.0), and the driver runs
    on that node, so loopback works here; the node address is for a scraper elsewhere (and may not
    be reachable from a laptop: a cloud VM's private address)."""
    if not port:
        return None, None
    return f"http://127.0.0.1:{port}/metrics", f"http://{node_ip}:{port}/metrics"


def start_ray(address: str | None, namespace: str | None = None) -> dict:
    """Attach to ``address`` or start a local cluster whose dashboard listens on 127.0.0.1 only,
    with the driver (and so every actor it creates) in ``namespace``. Returns where to watch and
    find things: dashboard URL, Prometheus endpoint, exported metric prefix, namespace. When Ray
    was already initialised (a test, a notebook), its namespace is kept and reported."""
    import ray

    if not ray.is_initialized():
        env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
        if address:
            ray.init(address=address, namespace=namespace, runtime_env=env, log_to_driver=True)
        else:
            ended = reap_orphans()
            if ended:
                print(f"ended {len(ended)} process(es) of a local Ray cluster left behind by a run that was killed")
            # The dashboard (an HTTP API that can submit jobs) listens on loopback only. No idle
            # workers are prestarted: every role is an actor with its own runtime env (threads),
            # which a prestarted worker cannot host, so they only took CPU from the roles' start-up
            # (2 processes importing Ray on a 2-core node, ~1 CPU-second; benchmarks/startup.py).
            ray.init(address="local", namespace=namespace, include_dashboard=True, dashboard_host="127.0.0.1",
                     runtime_env=env, log_to_driver=True, _system_config=NO_PRESTART)
            global _STARTED_LOCAL
            _STARTED_LOCAL = True
            _remember_local_cluster()
    ctx = ray.get_runtime_context()
    node = next((n for n in ray.nodes() if n["NodeID"] == ctx.get_node_id()), {})
    local, remote = metrics_urls(node.get("NodeManagerAddress", ""), node.get("MetricsExportPort"))
    where = {"dashboard": None, "metrics": local, "metrics_other_machines": remote,
             "metric_prefix": EXPORTED_PREFIX, "namespace": ctx.namespace,
             "gcs_address": getattr(ctx, "gcs_address", None)}
    try:
        from ray._private.worker import global_worker

        url = global_worker.node.address_info.get("webui_url")
        where["dashboard"] = f"http://{url}" if url else None
    except Exception:  # attached clients may not know the dashboard address
        pass
    key = (where["gcs_address"], where["namespace"])
    if key not in _ANNOUNCED:  # once per cluster and process: the pipeline's stages share one
        _ANNOUNCED.add(key)
        print(banner(where))
    return where


_ANNOUNCED: set = set()


def banner(where: dict) -> str:
    """What the start-up prints about the cluster: every name and address exactly as a user
    types or opens it."""
    metrics = where["metrics"] or "not available"
    if where.get("metrics_other_machines"):
        metrics += f" (from another machine: {where['metrics_other_machines']})"
    ns, address = where["namespace"], where.get("gcs_address") or "auto"
    return (f"Ray dashboard: {where['dashboard'] or 'not available'}\n"
            f"Prometheus metrics ({where['metric_prefix']}*): {metrics}\n"
            f"Ray namespace of the actors: {ns!r} (from another shell: "
            f"ray.init(address={address!r}, namespace={ns!r}); ray.util.list_named_actors(), then "
            f"ray.get_actor(name))")
