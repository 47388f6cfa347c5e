"""A zoo of image rewards behind one interface, differentiable unless marked otherwise (``reward.differentiable``).

from rewards import get_reward, list_rewards
reward = get_reward("aesthetic")          # a frozen torch.nn.Module
scores = reward(images)                   # images: float NCHW in [0, 1]; scores: Tensor[B], higher is better
mix = 0.7 * get_reward("aesthetic") + 0.3 * get_reward("brightness")

The names below are imported on first use (PEP 562), so that ``import rewards`` and ``python -m rewards --help``
do not load torch; the built-in rewards register themselves when the registry is first asked for them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rewards.base import Reward
    from rewards.combine import CombinedReward, combine, parse_reward_spec
    from rewards.registry import get_reward, list_rewards, register_reward
    from rewards.weights import MissingWeightsError, WeightsMismatchError

_EXPORTS = {
    "CombinedReward": "rewards.combine",
    "MissingWeightsError": "rewards.weights",
    "Reward": "rewards.base",
    "WeightsMismatchError": "rewards.weights",
    "combine": "rewards.combine",
    "get_reward": "rewards.registry",
    "list_rewards": "rewards.registry",
    "parse_reward_spec": "rewards.combine",
    "register_reward": "rewards.registry",
}
__all__ = [
    "CombinedReward",
    "MissingWeightsError",
    "Reward",
    "WeightsMismatchError",
    "combine",
    "get_reward",
    "list_rewards",
    "parse_reward_spec",
    "register_reward",
]


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rewards' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """``rewards.combine`` is the function, as it was when this package imported everything eagerly: importing the
    submodule of the same name (``rewards/combine.py``) would otherwise rebind the package attribute to it."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "combine" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
