"""Placement plan from the config, and the pre-flight fit check (both pure, no Ray)."""

from pathlib import Path

import pytest

from rlhf_ray.config import config_from_dict, load_config
from rlhf_ray.runtime.placement import PlacementError, RolePlacement, check_fits, fits_some_node, placement_plan

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml")
FLAGS = "Lower --resources.<role>.num_cpus/num_gpus, --rollout.num_engines or --learner.num_ranks, or add nodes."


def _gpu_config():
    return config_from_dict({
        "rollout": {"num_engines": 2},
        "learner": {"num_ranks": 4},
        "resources": {
            "strategy": "SPREAD",
            "rollout": {"num_cpus": 1, "num_gpus": 0.5, "custom": {"node_a": 1}},
            "reference": {"num_cpus": 0.5, "num_gpus": 0.25},
            "reward": {"num_cpus": 0.5},
            "learner": {"num_cpus": 2, "num_gpus": 1, "custom": {"node_b": 0.5}},
        },
    })


def _small_cpu_config():
    """The CPU demo's shape: logical CPU shares that fit a 2-core machine."""
    return config_from_dict({
        "rollout": {"num_engines": 1},
        "learner": {"num_ranks": 2},
        "resources": {"learner": {"num_cpus": 0.5}, "rollout": {"num_cpus": 0.5},
                      "reference": {"num_cpus": 0.25}, "reward": {"num_cpus": 0.25}},
    })


def test_cpu_plan():
    plan = placement_plan(_small_cpu_config())
    assert plan == [
        RolePlacement("rollout", 1, {"CPU": 0.5}, "PACK"),
        RolePlacement("reference", 1, {"CPU": 0.25}, "PACK"),
        RolePlacement("reward", 1, {"CPU": 0.25}, "PACK"),
        RolePlacement("learner", 2, {"CPU": 0.5}, "PACK"),
    ]
    assert [p.describe() for p in plan] == [
        "rollout    x1  {CPU=0.5}  PACK",
        "reference  x1  {CPU=0.25}  PACK",
        "reward     x1  {CPU=0.25}  PACK",
        "learner    x2  {CPU=0.5}  PACK",
    ]


def test_demo_config_fits_a_two_core_machine():
    check_fits(placement_plan(load_config(DEMO)), {"CPU": 2.0})


def test_plan_with_gpus_and_custom_resources():
    plan = {p.role: p for p in placement_plan(_gpu_config())}
    assert plan["rollout"] == RolePlacement("rollout", 2, {"CPU": 1.0, "GPU": 0.5, "node_a": 1.0}, "SPREAD")
    assert plan["reference"] == RolePlacement("reference", 1, {"CPU": 0.5, "GPU": 0.25}, "SPREAD")
    assert plan["reward"] == RolePlacement("reward", 1, {"CPU": 0.5}, "SPREAD")
    assert plan["learner"] == RolePlacement("learner", 4, {"CPU": 2.0, "GPU": 1.0, "node_b": 0.5}, "SPREAD")
    assert plan["learner"].describe() == "learner    x4  {CPU=2, GPU=1, node_b=0.5}  SPREAD"
    assert all(type(v) is float for p in plan.values() for v in p.bundle.values())


def test_zero_resources_are_left_out_of_a_bundle():
    cfg = config_from_dict({"resources": {
        "learner": {"num_cpus": 0, "num_gpus": 1},
        "reward": {"num_cpus": 0},  # nothing at all: Ray needs a non-empty bundle
        "rollout": {"custom": {"node_a": 0}},
    }})
    plan = {p.role: p.bundle for p in placement_plan(cfg)}
    assert plan["learner"] == {"GPU": 1.0}
    assert plan["reward"] == {"CPU": 0.01}
    assert plan["rollout"] == {"CPU": 1.0}


def test_plan_does_not_share_bundles_with_the_config():
    cfg = config_from_dict({"resources": {"rollout": {"custom": {"node_a": 1}}}})
    placement_plan(cfg)[0].bundle["node_a"] = 99.0
    assert cfg.resources.rollout.custom == {"node_a": 1.0}


# ---- check_fits ---------------------------------------------------------------------


def test_fits_exactly_and_ignores_other_cluster_resources():
    check_fits(placement_plan(_small_cpu_config()), {"CPU": 2.0})
    check_fits(placement_plan(_small_cpu_config()), {"CPU": 16.0, "memory": 1e9, "node:127.0.0.1": 1.0})


def test_float_sums_at_the_limit_fit():
    cfg = config_from_dict({"rollout": {"num_engines": 1}, "learner": {"num_ranks": 1}, "resources": {
        "rollout": {"num_cpus": 0.1}, "reference": {"num_cpus": 0.1}, "reward": {"num_cpus": 0.1},
        "learner": {"num_cpus": 0, "num_gpus": 1}}})
    assert 0.1 + 0.1 + 0.1 > 0.3  # what the plan adds up to, in floats
    check_fits(placement_plan(cfg), {"CPU": 0.3, "GPU": 1.0})
    with pytest.raises(PlacementError, match="CPU: plan needs 0.3, cluster has 0.29"):
        check_fits(placement_plan(cfg), {"CPU": 0.29, "GPU": 1.0})


def test_short_cpu_names_the_resource_amounts_and_flags():
    with pytest.raises(PlacementError) as err:
        check_fits(placement_plan(_small_cpu_config()), {"CPU": 1.5})
    msg = str(err.value)
    assert "CPU: plan needs 2, cluster has 1.5" in msg
    assert "learner    x2  {CPU=0.5}  PACK" in msg
    assert msg.endswith(FLAGS)


def test_only_the_short_resources_are_listed():
    with pytest.raises(PlacementError) as err:
        check_fits(placement_plan(_gpu_config()), {"CPU": 100.0, "GPU": 4.0, "node_a": 2.0, "node_b": 2.0})
    msg = str(err.value)
    # GPUs: 2 * 0.5 + 0.25 + 4 * 1 = 5.25
    assert "GPU: plan needs 5.25, cluster has 4" in msg
    assert "CPU: plan needs" not in msg and "node_a" not in msg.split("plan:")[0]


def test_missing_resources_count_as_zero():
    with pytest.raises(PlacementError) as err:
        check_fits(placement_plan(_gpu_config()), {"CPU": 100.0})
    msg = str(err.value)
    assert "GPU: plan needs 5.25, cluster has 0" in msg
    assert "node_a: plan needs 2, cluster has 0" in msg
    assert "node_b: plan needs 2, cluster has 0" in msg


def test_gpu_config_fits_when_enough():
    check_fits(placement_plan(_gpu_config()), {"CPU": 11.0, "GPU": 5.25, "node_a": 2.0, "node_b": 2.0})


def test_short_custom_resource_names_the_custom_flag():
    with pytest.raises(PlacementError, match=r"--resources\.<role>\.custom|--resources\.rollout\.custom"):
        check_fits(placement_plan(_gpu_config()), {"CPU": 100.0, "GPU": 8.0, "node_b": 2.0})


def test_a_bundle_fits_some_node_only_where_one_node_has_all_it_asks_for():
    nodes = [{"CPU": 2.0, "node_a": 4.0}, {"CPU": 0.25, "node_b": 4.0}]
    assert fits_some_node({"CPU": 0.5, "node_a": 1.0}, nodes)
    assert not fits_some_node({"CPU": 0.5, "node_b": 1.0}, nodes)  # node_b's node has too little CPU
    assert not fits_some_node({"CPU": 0.5, "node_b": 1.0}, nodes[:1])  # the node offering node_b is gone
    assert fits_some_node({"CPU": 0.25, "node_b": 1.0}, nodes)
    assert not fits_some_node({"CPU": 0.01}, [])
