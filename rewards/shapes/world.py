"""The embedded shapes world: small images of a few coloured shapes on a grey background, with captions.

Generated on the fly from a seed (no dataset download). A scene holds 1-3 shapes (0 for the classifier's "empty"
class) of one colour and one kind, all of one size, placed without overlap on a uniform grey background.
Captions name the count, colour and kind ("two red circles"); size and background are left free, so rewards on
them (bigger shapes, a brighter background) can change an image without contradicting its prompt.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("no", "one", "two", "three")
MAX_COUNT = len(COUNT_WORDS) - 1
RESOLUTION = 32
"""Side of the world's images in pixels."""
SIZE_RANGE = (0.11, 0.20)
"""Shape "radius" as a fraction of the image side (3.5 to 6.4 pixels at 32x32)."""
BACKGROUND_RANGE = (0.10, 0.50)
"""Grey level of the background."""
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One image's content. ``size`` in [0, 1] spans :data:`SIZE_RANGE`; ``centers`` are fractions of the side."""

    count: int
    color: str
    shape: str
    size: float
    background: float
    centers: tuple[tuple[float, float], ...]

    @property
    def caption(self) -> str:
        return caption(self.count, self.color, self.shape)


def caption(count: int, color: str, shape: str) -> str:
    """``caption(2, "red", "circle") == "two red circles"``."""
    return f"{COUNT_WORDS[count]} {color} {shape}{'' if count == 1 else 's'}"


def all_captions() -> list[str]:
    """Every caption of the world (1-3 shapes): 36 in all, in a fixed order."""
    return [caption(n, c, s) for n in range(1, MAX_COUNT + 1) for c in COLORS for s in SHAPES]


_CAPTION = re.compile(r"^\s*(a|an|no|one|two|three)\s+(\w+)\s+(\w+?)s?\s*$")


def parse_caption(text: str) -> tuple[int, str, str]:
    """``(count, color, shape)`` of a world caption; ``ValueError`` naming the grammar otherwise."""
    match = _CAPTION.match(text.lower())
    if match is None or match.group(2) not in COLORS or match.group(3) not in SHAPES:
        raise ValueError(
            f"{text!r} is not a shapes-world caption; expected '<count> <color> <shape>[s]' with count in "
            f"{COUNT_WORDS[1:]}, color in {tuple(COLORS)} and shape in {SHAPES}, e.g. 'two red circles'"
        )
    word = match.group(1)
    count = 1 if word in ("a", "an") else COUNT_WORDS.index(word)
    return count, match.group(2), match.group(3)


def radius(size: float) -> float:
    """Shape radius as a fraction of the image side for a normalised ``size`` in [0, 1]."""
    low, high = SIZE_RANGE
    return low + size * (high - low)


def shape_area(size: float) -> float:
    """Area of one shape as a fraction of the image's area: every kind has the circle's, ``pi * radius(size)**2``."""
    return math.pi * radius(size) ** 2


def size_from_area(area: torch.Tensor) -> torch.Tensor:
    """The normalised size (the inverse of :func:`shape_area`) of shapes covering ``area``, a fraction of the image's
    area; not clamped, so an area outside the world's range gives a size outside [0, 1] (area 0 gives the least)."""
    low, high = SIZE_RANGE
    return ((area.clamp_min(0) / math.pi).sqrt() - low) / (high - low)


def shape_mask(shape: str, center: tuple[float, float], r: float, resolution: int) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of one shape, shape (H, W); coordinates are fractions of the side."""
    n = resolution * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - center[0], y - center[1]
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        half = r * math.sqrt(math.pi) / 2  # same area as the circle
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    elif shape == "triangle":
        side = r * 2 * math.sqrt(math.pi / math.sqrt(3))  # equilateral, same area as the circle
        height = side * math.sqrt(3) / 2
        top = dy >= -2 * height / 3
        bottom = dy <= height / 3
        slant = dx.abs() <= (dy + 2 * height / 3) / math.sqrt(3)
        inside = top & bottom & slant
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return F.avg_pool2d(inside.float()[None, None], SUPERSAMPLE)[0, 0]


KIND_STATISTICS = {"circle": (0.0, math.pi / 4), "square": (0.0, 1.0), "triangle": (-2 * math.sqrt(2) / 5, 0.5)}
"""Two statistics of each kind as :func:`shape_mask` draws it, neither depending on size or position: the vertical
skewness of its area (0 for the symmetric circle and square; the upright triangle's area grows linearly towards its
base, below: -2 sqrt(2) / 5), and its chord fill ratio, area / (longest vertical chord x longest horizontal chord)
(the circle's pi r^2 / (2r)^2, the axis-aligned square's 1, the triangle's (side x height / 2) / (height x side))."""


def sample_scene(
    rng: random.Random, count: int | None = None, color: str | None = None, shape: str | None = None
) -> Scene:
    """A random scene; fix ``count``, ``color`` or ``shape`` to condition on a caption."""
    count = rng.randint(1, MAX_COUNT) if count is None else count
    color = rng.choice(list(COLORS)) if color is None else color
    shape = rng.choice(SHAPES) if shape is None else shape
    background = rng.uniform(*BACKGROUND_RANGE)
    while True:
        size = rng.random()
        r = radius(size)
        margin = r * 1.6 + 0.01
        centers: list[tuple[float, float]] = []
        for _ in range(200):
            if len(centers) == count:
                break
            candidate = (rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin))
            if all(math.dist(candidate, c) > 2.6 * r for c in centers):
                centers.append(candidate)
        if len(centers) == count:  # else this size does not fit: draw another
            return Scene(count, color, shape, size, background, tuple(centers))


def render(scene: Scene, resolution: int = RESOLUTION) -> torch.Tensor:
    """The scene as a float RGB image in [0, 1], shape (3, H, W)."""
    image = torch.full((3, resolution, resolution), scene.background)
    color = torch.tensor(COLORS[scene.color]).view(3, 1, 1)
    r = radius(scene.size)
    for center in scene.centers:
        alpha = shape_mask(scene.shape, center, r, resolution)[None]
        image = image * (1 - alpha) + color * alpha
    return image


@dataclass
class Batch:
    """Rendered images (N, 3, H, W) with their captions and labels (index tensors; ``size`` in [0, 1])."""

    images: torch.Tensor
    captions: list[str]
    count: torch.Tensor
    color: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor


def sample_batch(n: int, rng: random.Random, empty_fraction: float = 0.0, resolution: int = RESOLUTION) -> Batch:
    """``n`` random scenes, a fraction of them empty (count 0, for the classifier), rendered."""
    scenes = [sample_scene(rng, count=0 if rng.random() < empty_fraction else None) for _ in range(n)]
    return Batch(
        images=torch.stack([render(s, resolution) for s in scenes]),
        captions=[s.caption for s in scenes],
        count=torch.tensor([s.count for s in scenes]),
        color=torch.tensor([list(COLORS).index(s.color) for s in scenes]),
        shape=torch.tensor([SHAPES.index(s.shape) for s in scenes]),
        size=torch.tensor([s.size for s in scenes]),
    )
