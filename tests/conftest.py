"""Test-wide setup: no network, empty weight caches, GPU tests skipped on CPU machines."""

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub or torch.hub: never download, never read the user's caches.
_CACHE = tempfile.mkdtemp(prefix="draft-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_CACHE, "hf")
os.environ["TORCH_HOME"] = os.path.join(_CACHE, "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

REFERENCE_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "weights"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
