"""A zoo of differentiable image rewards behind one interface.

from rewards import get_reward, list_rewards
reward = get_reward("aesthetic")          # a frozen torch.nn.Module
scores = reward(images)                   # images: float NCHW in [0, 1]; scores: Tensor[B], higher is better
mix = 0.7 * get_reward("aesthetic") + 0.3 * get_reward("brightness")
"""

from rewards import aesthetic, hps, imagereward, owlvit, pickscore, resnet, shapes, simple, yolo  # noqa: F401  (register the members)
from rewards.base import Reward
from rewards.combine import CombinedReward, combine, parse_reward_spec
from rewards.registry import get_reward, list_rewards, register_reward
from rewards.weights import MissingWeightsError, WeightsMismatchError

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
