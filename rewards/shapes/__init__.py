"""The embedded shapes world (procedural images and captions) and its classifier reward ``shapes``."""

from rewards.shapes.classifier import Prediction, ShapesClassifier, ShapesReward, prompt_agreement
from rewards.shapes.world import COLORS, RESOLUTION, SHAPES, Scene, all_captions, parse_caption, render, sample_batch

__all__ = [
    "COLORS",
    "RESOLUTION",
    "SHAPES",
    "Prediction",
    "Scene",
    "ShapesClassifier",
    "ShapesReward",
    "all_captions",
    "parse_caption",
    "prompt_agreement",
    "render",
    "sample_batch",
]
