"""Fixtures shared by the unit and GPU tests (no Ray here: tests/unit collects without it)."""

from __future__ import annotations

import pytest
import torch

from tests import inprocess as ip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Llama, built once per test module."""
    from rlhf_ray.tiny_models import ensure_tiny_model

    return str(ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", seed=0))


@pytest.fixture(scope="module")
def checkpoint(tiny_model) -> dict[str, torch.Tensor]:
    """The tiny model's weights as saved (HF names)."""
    return ip.hf_state_dict(tiny_model)
