"""Sample diversity: per prompt, the mean pairwise distance between the images of different seeds in a feature
space, averaged over prompts. A fine-tuned model that draws the same picture for every seed (mode collapse, a
common face of reward hacking) scores near 0.

Feature spaces, best first (:func:`feature_space`):

* a reward's image embedding (``reward.embed(images)``): CLIP ViT-L/14 for ``aesthetic`` (on real models), the
  world classifiers' features for ``shapes``/``shapes-match`` and ``shapes-judge``/``shapes-judge-match`` (the
  embedded world; a run's default judge is the latter). Distance: cosine distance ``1 - cos`` (0 to 2).
* pixels, the fallback when no reward in the run has an embedding: images area-resized to at most 64 x 64,
  distance = RMS difference per pixel channel (0 to 1). It sees layout and colour, not content.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PIXEL_SIDE = 64
"""Side of the pixel-space fallback's images."""


@dataclass(frozen=True)
class FeatureSpace:
    """Where diversity is measured: ``features(images [N, 3, H, W] in [0, 1]) -> [N, D]`` and a distance."""

    name: str
    features: Callable[[torch.Tensor], torch.Tensor]
    cosine: bool

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Pairwise distances [N, N] between rows of ``features``."""
        features = features.float()
        if self.cosine:
            unit = F.normalize(features, dim=-1)
            return (1 - unit @ unit.T).clamp_min(0)
        return torch.cdist(features, features) / features.shape[-1] ** 0.5


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Images area-resized to at most :data:`PIXEL_SIDE` pixels a side, flattened."""
    if max(images.shape[-2:]) > PIXEL_SIDE:
        images = F.adaptive_avg_pool2d(images.float(), PIXEL_SIDE)
    return images.flatten(1).float()


PIXELS = FeatureSpace(f"pixels {PIXEL_SIDE}x{PIXEL_SIDE} (RMS)", pixel_features, cosine=False)


def feature_space(rewards: Iterable[object]) -> FeatureSpace:
    """The embedding of the first reward (or mix member) that has one, else :data:`PIXELS`."""
    for reward in rewards:
        members = getattr(reward, "members", None)
        for candidate in [reward, *(members.values() if isinstance(members, dict) else ())]:
            embed = getattr(candidate, "embed", None)
            if callable(embed):
                name = getattr(candidate, "name", type(candidate).__name__)
                return FeatureSpace(f"{name} image embedding (cosine)", embed, cosine=True)
    return PIXELS


@torch.no_grad()
def diversity(
    images: torch.Tensor, seeds: int, space: FeatureSpace = PIXELS, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-prompt mean pairwise distance [P] between the ``seeds`` images of each prompt; ``images`` are
    prompt-major ([P * seeds, 3, H, W], every seed of the first prompt first), as the trainer's evaluation renders
    them. Needs at least 2 seeds."""
    if seeds < 2:
        raise ValueError(f"diversity needs at least 2 images per prompt (evaluation seeds); got {seeds}")
    if len(images) % seeds:
        raise ValueError(f"{len(images)} images are not a whole number of prompts x {seeds} seeds")
    features = space.features(images.to(device)).float().cpu()
    per_prompt = features.reshape(len(images) // seeds, seeds, -1)
    off_diagonal = ~torch.eye(seeds, dtype=torch.bool)
    return torch.stack([space.distances(group)[off_diagonal].mean() for group in per_prompt])
