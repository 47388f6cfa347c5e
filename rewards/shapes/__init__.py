"""The embedded shapes world (procedural images and captions), its classifier reward ``shapes``, the independent
judge ``shapes-judge`` and the learning-free measurement ``shapes-geometry``.

Names are imported on first use (PEP 562): the world's captions do not load the classifier's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rewards.shapes.classifier import Prediction, ShapesClassifier, ShapesReward, prompt_agreement
    from rewards.shapes.geometry import Measurement, measure
    from rewards.shapes.judge import ShapesJudge
    from rewards.shapes.world import (
        COLORS,
        RESOLUTION,
        SHAPES,
        Scene,
        all_captions,
        parse_caption,
        render,
        sample_batch,
    )

_EXPORTS = {
    **dict.fromkeys(
        ("Prediction", "ShapesClassifier", "ShapesReward", "prompt_agreement"), "rewards.shapes.classifier"
    ),
    **dict.fromkeys(
        ("COLORS", "RESOLUTION", "SHAPES", "Scene", "all_captions", "parse_caption", "render", "sample_batch"),
        "rewards.shapes.world",
    ),
    **dict.fromkeys(("Measurement", "measure"), "rewards.shapes.geometry"),
    "ShapesJudge": "rewards.shapes.judge",
}
__all__ = [
    "COLORS",
    "RESOLUTION",
    "SHAPES",
    "Measurement",
    "Prediction",
    "Scene",
    "ShapesClassifier",
    "ShapesJudge",
    "ShapesReward",
    "all_captions",
    "measure",
    "parse_caption",
    "prompt_agreement",
    "render",
    "sample_batch",
]


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rewards.shapes' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
