"""Test-wide setup: no network, empty weight caches, one share of the cores per xdist worker, GPU tests skipped on
CPU machines."""

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub or torch.hub: never download, never read the user's caches.
_CACHE = tempfile.mkdtemp(prefix="draft-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_CACHE, "hf")
os.environ["TORCH_HOME"] = os.path.join(_CACHE, "torch")
# pytest-xdist runs one worker per core (`-n auto` in pyproject.toml): each worker, and the processes its tests start,
# gets its share of the cores, instead of every worker's torch starting one thread per core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:  # in case a plugin imported torch before this file
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REFERENCE_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "weights"


def _optional_rewards() -> set[str]:
    """Rewards whose packages come from an optional extra (e.g. ``yolo``)."""
    from rewards.registry import get_entry, list_rewards

    return {name for name in list_rewards() if get_entry(name).requires}


def _needs_extra(item, optional: set[str]) -> bool:
    """A test parametrised over a reward that needs an optional extra."""
    params = item.callspec.params.values() if hasattr(item, "callspec") else ()
    return any(isinstance(value, str) and value in optional for value in params)


def pytest_collection_modifyitems(config, items):
    optional = _optional_rewards()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if _needs_extra(item, optional):
            item.add_marker(pytest.mark.extra)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
