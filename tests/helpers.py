"""Shared test helpers."""

from pathlib import Path

import pytest

from rewards.weights import file_sha256
from tests.conftest import REFERENCE_WEIGHTS

V2_HEAD = ("sac+logos+ava1-l14-linearMSE.pth", "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0")
V1_HEAD = ("sa_0_4_vit_l_14_linear.pth", "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba")


def reference_weight(name_and_sha: tuple[str, str]) -> Path:
    """Path of a reference head in ../shared/reference/weights; skip the test if absent or altered."""
    name, sha = name_and_sha
    path = REFERENCE_WEIGHTS / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    if file_sha256(path) != sha:
        pytest.skip(f"{path} has an unexpected sha256")
    return path
