"""Detector rewards: per-box detection probabilities of a target turned into one score per image.

A member implements :meth:`DetectorReward.box_probabilities`; aggregation, the add/remove mode and the nominal
scale live here once.
"""

from __future__ import annotations

import torch

from rewards.base import Reward

AGGREGATIONS = ("soft_count", "max")
MODES = ("add", "remove")


class DetectorReward(Reward):
    """``soft_count``: the sum of the box probabilities, each weighted by ``sigmoid((p - threshold) /
    temperature)`` when a threshold is given (a differentiable "count boxes above the threshold"); ``max``: the
    best box. ``mode="remove"`` negates the value, so maximising the reward removes the object.

    Nominal scale (stated in the model cards): soft counts 0-5 (mean 1, std 1), max probabilities 0-1 (mean 0.3,
    std 0.2), negated for removal.
    """

    def __init__(
        self,
        mode: str = "add",
        aggregation: str = "soft_count",
        threshold: float | None = None,
        temperature: float = 0.05,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}")
        self.mode, self.aggregation, self.threshold, self.temperature = mode, aggregation, threshold, temperature
        (low, high), (mean, std) = ((0.0, 5.0), (1.0, 1.0)) if aggregation == "soft_count" else ((0.0, 1.0), (0.3, 0.2))
        self.typical_range = (low, high) if mode == "add" else (-high, -low)
        self.normalization = (mean, std) if mode == "add" else (-mean, std)

    def box_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[B, boxes] detection probabilities of the target. Members implement this."""
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        probabilities = self.box_probabilities(images).float()
        if self.aggregation == "max":
            value = probabilities.amax(dim=1)
        else:
            if self.threshold is not None:
                probabilities = probabilities * torch.sigmoid((probabilities - self.threshold) / self.temperature)
            value = probabilities.sum(dim=1)
        return value if self.mode == "add" else -value
