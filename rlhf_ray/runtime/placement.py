"""Where each role runs: one Ray placement group per role, built from the config.

``placement_plan`` and ``check_fits`` are pure (testable without Ray); ``create_groups``
reserves the groups and fails with a message naming the role that cannot be placed.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.config import Config, RoleResources
from rlhf_ray.config.validate import reference_from_learner


@dataclass(frozen=True)
class RolePlacement:
    role: str
    count: int  # actors of this role, one bundle each
    bundle: dict[str, float]  # resources of one actor
    strategy: str

    def describe(self) -> str:
        res = ", ".join(f"{k}={v:g}" for k, v in self.bundle.items())
        return f"{self.role:<10} x{self.count}  {{{res}}}  {self.strategy}"


class PlacementError(RuntimeError):
    pass


def role_bundle(res: RoleResources) -> dict[str, float]:
    """Ray resources of one actor of a role (at least a sliver of CPU so the bundle is valid)."""
    out = {"CPU": float(res.num_cpus)}
    if res.num_gpus:
        out["GPU"] = float(res.num_gpus)
    out.update({k: float(v) for k, v in res.custom.items()})
    return {k: v for k, v in out.items() if v > 0} or {"CPU": 0.01}


def placement_plan(cfg: Config) -> list[RolePlacement]:
    """One entry per role, one bundle per actor (engine, replica, rank); no reference role when the
    learners compute the reference (LoRA)."""
    r = cfg.resources
    plan = [
        RolePlacement("rollout", cfg.rollout.num_engines, role_bundle(r.rollout), r.strategy),
        RolePlacement("reference", cfg.reference.replicas, role_bundle(r.reference), r.strategy),
        RolePlacement("reward", cfg.reward.replicas, role_bundle(r.reward), r.strategy),
        RolePlacement("learner", cfg.learner.num_ranks, role_bundle(r.learner), r.strategy),
    ]
    return [p for p in plan if not (p.role == "reference" and reference_from_learner(cfg))]


def check_fits(plan: list[RolePlacement], cluster: dict[str, float]) -> None:
    """Raise PlacementError if the plan asks for more of a resource than the cluster has."""
    need: dict[str, float] = {}
    for p in plan:
        for k, v in p.bundle.items():
            need[k] = need.get(k, 0.0) + v * p.count
    short = {k: (v, cluster.get(k, 0.0)) for k, v in need.items() if v > cluster.get(k, 0.0) + 1e-9}
    if short:
        lines = [f"{k}: plan needs {v:g}, cluster has {have:g}" for k, (v, have) in short.items()]
        roles = "; ".join(p.describe() for p in plan)
        custom = [k for k in short if k not in ("CPU", "GPU", "memory")]
        hint = ("Lower --resources.<role>.num_cpus/num_gpus, --rollout.num_engines or --learner.num_ranks, "
                "or add nodes.")
        if any(p.role in ("reference", "reward") and p.count > 1 for p in plan):
            hint += " --reference.replicas and --reward.replicas count too."
        if custom:
            hint += (f" Custom resources {custom} come from --resources.<role>.custom: start nodes that offer "
                     "them (ray start --resources '{...}') or drop them from the config.")
        raise PlacementError("the roles do not fit on this cluster:\n  " + "\n  ".join(lines)
                             + f"\n  plan: {roles}\n" + hint)


def create_groups(plan: list[RolePlacement], timeout_s: float) -> dict:
    """Reserve one placement group per role; waits until all are ready or raises."""
    import ray
    from ray.util.placement_group import placement_group

    groups = {p.role: placement_group([dict(p.bundle) for _ in range(p.count)], strategy=p.strategy,
                                      name=f"rlhf-{p.role}") for p in plan}
    for role, pg in groups.items():
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise PlacementError(
                f"placement group for role {role!r} was not ready after {timeout_s:.0f} s: the cluster has "
                "no node (or not enough nodes) with the resources it asks for. Check `ray status` and the "
                "--resources settings.")
    return groups


def fits_some_node(bundle: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    """Whether one actor's ``bundle`` (``role_bundle``) could be placed on one of ``nodes`` (each
    node's total resources, as ``ray.nodes()`` reports them), were that node idle. False means
    no replacement can ever start there: e.g. the role asks for a custom resource that only a
    lost node offered."""
    return any(all(have.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for have in nodes)


def on_one_node(pings: list[dict]) -> bool:
    """Whether the actors that answered ``ping`` (``RoleBase.ping``) all run on one machine: their
    groups then rendezvous over 127.0.0.1, so nothing of theirs listens on the network."""
    return len({p["node_ip"] for p in pings}) == 1


def actor_options(pg, index: int, res: RoleResources, name: str, env: dict[str, str]) -> dict:
    """``.options(...)`` for the actor in bundle ``index`` of ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts = dict(
        name=name,
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=index,
            placement_group_capture_child_tasks=True),
        runtime_env={"env_vars": env},
        max_concurrency=1,
    )
    if res.custom:
        opts["resources"] = dict(res.custom)
    return opts
