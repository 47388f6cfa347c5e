"""Weight-free rewards: simple image statistics that need no download (tests, demos, sanity checks).

Each works at any resolution and is cheap; each is also easy to hack (that is the point of a sanity check: a
fine-tuning run on ``brightness`` should visibly brighten images).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rewards.base import Reward
from rewards.registry import register_reward

LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)
"""Rec. 709 luma coefficients for linear-ish RGB."""

NAMED_COLORS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}


def luma(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel Rec. 709 luma, shape (N, H, W)."""
    weights = torch.tensor(LUMA_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1)


class BrightnessReward(Reward):
    """Mean luma in [0, 1]."""

    name = "brightness"
    typical_range = (0.3, 0.6)
    normalization = (0.45, 0.15)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return luma(images).mean(dim=(1, 2))


class ContrastReward(Reward):
    """RMS contrast: standard deviation of luma over the image, in [0, 0.5]."""

    name = "contrast"
    typical_range = (0.15, 0.3)
    normalization = (0.22, 0.07)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return luma(images).flatten(1).std(dim=1)


class SaturationReward(Reward):
    """Mean HSV saturation ``(max - min) / max`` in [0, 1]; the value is floored at ``eps`` so near-black pixels
    have bounded gradients."""

    name = "saturation"
    typical_range = (0.2, 0.5)
    normalization = (0.35, 0.15)

    def __init__(self, eps: float = 0.02) -> None:
        super().__init__()
        self.eps = eps

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        high = images.amax(dim=1)
        low = images.amin(dim=1)
        return ((high - low) / high.clamp_min(self.eps)).mean(dim=(1, 2))


class TargetColorReward(Reward):
    """Closeness to a target colour: ``-mean ||pixel - color||^2 / 3`` in [-1, 0] (0 = every pixel is the colour)."""

    name = "target-color"
    typical_range = (-0.4, -0.1)
    normalization = (-0.25, 0.1)

    def __init__(self, color: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("color", torch.tensor(color, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return -((images - self.color.to(images.dtype)) ** 2).mean(dim=(1, 2, 3))


def parse_color(color: str | Sequence[float]) -> tuple[float, float, float]:
    """A colour name, ``#rrggbb`` hex string, or an RGB triple in [0, 1] (or 0-255 integers)."""
    if isinstance(color, str):
        text = color.strip().lower()
        if text in NAMED_COLORS:
            return NAMED_COLORS[text]
        if text.startswith("#") and len(text) == 7:
            try:
                return tuple(int(text[i : i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]
            except ValueError:
                pass
        raise ValueError(
            f"unknown colour {color!r}; use a name ({', '.join(NAMED_COLORS)}), '#rrggbb', or an RGB triple"
        )
    values = tuple(float(c) for c in color)
    if len(values) != 3:
        raise ValueError(f"colour must have 3 components (R, G, B); got {len(values)}")
    if all(float(c).is_integer() for c in values) and max(values) > 1:
        values = tuple(c / 255 for c in values)
    if not all(0.0 <= c <= 1.0 for c in values):
        raise ValueError(f"colour components must be in [0, 1] (or 0-255 integers); got {color!r}")
    return values  # type: ignore[return-value]


@register_reward("brightness")
def brightness(pretrained: bool = True, weights: dict | None = None) -> Reward:
    """Mean luma (Rec. 709) in [0, 1]; no weights."""
    return BrightnessReward()


@register_reward("contrast")
def contrast(pretrained: bool = True, weights: dict | None = None) -> Reward:
    """RMS contrast (standard deviation of luma) in [0, 0.5]; no weights."""
    return ContrastReward()


@register_reward("saturation")
def saturation(pretrained: bool = True, weights: dict | None = None, eps: float = 0.02) -> Reward:
    """Mean HSV saturation in [0, 1]; no weights."""
    return SaturationReward(eps)


@register_reward("target-color")
def target_color(pretrained: bool = True, weights: dict | None = None, color: str | Sequence[float] = "red") -> Reward:
    """Closeness of every pixel to a target colour (color='red', '#ff8800' or RGB), in [-1, 0]; no weights."""
    return TargetColorReward(parse_color(color))
