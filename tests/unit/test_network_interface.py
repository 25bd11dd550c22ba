"""resources.network_interface: gloo/NCCL sockets pinned on multi-node runs; a name that does not exist
here is a config error with the names that do."""

from __future__ import annotations

import socket

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.supervised.config import SFTRunConfig, validate_sft


def test_the_named_interface_reaches_every_actor_env():
    from rlhf_ray.runtime.cluster import base_env

    env = base_env(2, "eth7")
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth7" and env["OMP_NUM_THREADS"] == "2"
    assert "GLOO_SOCKET_IFNAME" not in base_env(2) and "NCCL_SOCKET_IFNAME" not in base_env(2, None)


def test_an_existing_interface_is_accepted_and_a_missing_one_named_with_the_choices():
    here = socket.if_nameindex()[0][1]
    load_config(None, {"resources.network_interface": here})
    with pytest.raises(ConfigError, match=r"no such network interface on this machine \(it has .*" + here):
        load_config(None, {"resources.network_interface": "nosuch0"})
    with pytest.raises(ConfigError, match="--train.network_interface 'nosuch0'"):
        load_config(None, {"train.network_interface": "nosuch0"}, cls=SFTRunConfig, validator=validate_sft)


def test_a_local_cluster_keeps_the_collectives_on_loopback(monkeypatch):
    from rlhf_ray.runtime import cluster

    monkeypatch.setattr(cluster, "_STARTED_LOCAL", False)  # attached to a cluster: the libraries choose
    assert cluster.collective_interface(None) is None
    assert cluster.collective_interface("eth7") == "eth7"
    monkeypatch.setattr(cluster, "_STARTED_LOCAL", True)  # this process started a single-node cluster
    loopback = {"lo", "lo0"} & {n for _, n in socket.if_nameindex()}
    assert cluster.collective_interface(None) in loopback and loopback
    assert cluster.collective_interface("eth7") == "eth7"  # a named interface always wins
