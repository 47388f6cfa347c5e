"""Turning per-box detection probabilities into one score per image (shared by the detector rewards)."""

from __future__ import annotations

import torch

AGGREGATIONS = ("soft_count", "max")
MODES = ("add", "remove")


def check_detection_options(mode: str, aggregation: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}")


def detection_scale(mode: str, aggregation: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(typical_range, normalization)`` of a detector reward (nominal values, stated in the model cards):
    soft counts of 0-5 (mean 1, std 1), max probabilities of 0-1 (mean 0.3, std 0.2), negated for removal."""
    (low, high), (mean, std) = ((0.0, 5.0), (1.0, 1.0)) if aggregation == "soft_count" else ((0.0, 1.0), (0.3, 0.2))
    return ((low, high), (mean, std)) if mode == "add" else ((-high, -low), (-mean, std))


def aggregate(
    probabilities: torch.Tensor, mode: str, aggregation: str, threshold: float | None, temperature: float
) -> torch.Tensor:
    """[B, boxes] probabilities -> [B] scores.

    ``soft_count``: the sum of the box probabilities, each weighted by ``sigmoid((p - threshold) / temperature)``
    when a threshold is given (a differentiable "count boxes above the threshold"); ``max``: the best box.
    ``mode="remove"`` negates the value, so maximising the reward removes the object.
    """
    if aggregation == "max":
        value = probabilities.amax(dim=1)
    else:
        if threshold is not None:
            probabilities = probabilities * torch.sigmoid((probabilities - threshold) / temperature)
        value = probabilities.sum(dim=1)
    return value if mode == "add" else -value
