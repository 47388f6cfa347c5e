"""Detector rewards: per-box detection probabilities of a target turned into one score per image.

A member implements :meth:`DetectorReward.box_probabilities`; aggregation, the add/remove mode, the hard count and
the nominal scale live here once.
"""

from __future__ import annotations

import torch

from rewards import hints
from rewards.base import Reward

AGGREGATIONS = ("soft_count", "max")
"""The differentiable aggregations, options of the ``owlvit`` and ``yolo`` rewards."""
HARD_COUNT = "count"
"""The hard count of the boxes above the threshold, which has no gradient: the ``owlvit-count`` and ``yolo-count``
rewards (separate names, because a registered name is differentiable or not whatever its options)."""
MODES = ("add", "remove")
RELATIVE_TEMPERATURE = 0.1
"""Default temperature as a fraction of the threshold's distance to the nearer end of the score scale [0, 1]: a
box scored 0 (or 1) is then gated to within sigmoid(-10) = 4.5e-5 of 0 (or 1)."""


def check_soft_aggregation(name: str, aggregation: object) -> None:
    """The ``owlvit`` and ``yolo`` rewards take the differentiable aggregations; the hard count is its own reward."""
    if aggregation == HARD_COUNT:
        raise ValueError(
            f"{hints.options(aggregation=HARD_COUNT)} is the hard count, which is not differentiable: use the "
            f"reward '{name}-{HARD_COUNT}' (the boxes above its threshold), or {hints.options(threshold=0.1)} for a "
            f"differentiable count"
        )


def default_temperature(threshold: float) -> float:
    """The gate's temperature when none is given: :data:`RELATIVE_TEMPERATURE` x min(threshold, 1 - threshold)."""
    return RELATIVE_TEMPERATURE * min(threshold, 1.0 - threshold)


class DetectorReward(Reward):
    """``soft_count``: without a threshold, the sum of the box probabilities (the expected number of detections if
    boxes are independent); with one, the sum of ``sigmoid((p - threshold) / temperature)`` over the boxes, a
    differentiable count of the boxes whose score exceeds the threshold (what ``post_process_object_detection``
    keeps), which it approaches as the temperature goes to 0. ``max``: the best box. ``count``: that count itself,
    hard (:meth:`hard_count`), so the reward is not differentiable. ``mode="remove"`` negates the value, so
    maximising the reward removes the object.

    Nominal scale (stated in the model cards): soft and hard counts 0-5 (mean 1, std 1), max probabilities 0-1
    (mean 0.3, std 0.2), negated for removal.
    """

    def __init__(
        self,
        mode: str = "add",
        aggregation: str = "soft_count",
        threshold: float | None = None,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        known = (*AGGREGATIONS, HARD_COUNT)
        if aggregation not in known:
            raise ValueError(f"aggregation must be one of {', '.join(known)}; got {aggregation!r}")
        if threshold is not None:
            if aggregation == "max":
                raise ValueError("threshold applies to aggregation='soft_count' (it counts boxes above it)")
            if not 0.0 < threshold < 1.0:
                raise ValueError(f"threshold is a box probability strictly between 0 and 1; got {threshold}")
        elif aggregation == HARD_COUNT:
            raise ValueError("the hard count counts the boxes above a threshold: give one")
        if temperature is not None:
            if aggregation == HARD_COUNT:
                raise ValueError("temperature sets the width of the soft count's gate; the hard count has none")
            if threshold is None:
                raise ValueError("temperature sets the width of the threshold's gate: give it with a threshold")
            if not temperature > 0:
                raise ValueError(f"temperature must be positive; got {temperature}")
        if threshold is not None and temperature is None and aggregation == "soft_count":
            temperature = default_temperature(threshold)
        self.mode, self.aggregation, self.threshold, self.temperature = mode, aggregation, threshold, temperature
        self.differentiable = aggregation != HARD_COUNT
        (low, high), (mean, std) = ((0.0, 1.0), (0.3, 0.2)) if aggregation == "max" else ((0.0, 5.0), (1.0, 1.0))
        self.typical_range = (low, high) if mode == "add" else (-high, -low)
        self.normalization = (mean, std) if mode == "add" else (-mean, std)

    def box_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[B, boxes] detection probabilities of the target. Members implement this."""
        raise NotImplementedError

    def hard_count(self, images: torch.Tensor) -> torch.Tensor:
        """[B] number of boxes whose probability exceeds the threshold (strictly, as transformers'
        ``post_process_object_detection`` keeps them). A member whose model postprocesses otherwise (YOLO's
        non-maximum suppression) overrides this with its own rule."""
        return (self.box_probabilities(images) > self.threshold).sum(dim=1)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        if self.aggregation == HARD_COUNT:
            value = self.hard_count(images).float()
            return value if self.mode == "add" else -value
        probabilities = self.box_probabilities(images).float()
        if self.aggregation == "max":
            value = probabilities.amax(dim=1)
        elif self.threshold is None:
            value = probabilities.sum(dim=1)
        else:
            value = torch.sigmoid((probabilities - self.threshold) / self.temperature).sum(dim=1)
        return value if self.mode == "add" else -value
