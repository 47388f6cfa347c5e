"""The shapes world's second, independent judge: ``shapes-judge`` and ``shapes-judge-match``.

A small max-pooling CNN with a flattened-spatial MLP head, trained by the project (``python -m
finetune.world.train judge``) with another seed on another stream of scenes than the ``shapes`` classifier. It
reads the same things (count 0-3, colour, kind, size) into the same
:class:`~rewards.shapes.classifier.Prediction`, so the objectives are the shared ones of
:class:`~rewards.shapes.classifier.ShapesReward`; only the model that reads the image differs. A reward trained
against ``shapes`` and judged by ``shapes-judge`` is judged by a model that shares none of its weights, training
scenes or architecture: max pooling and a head that reads the flattened 4x4 feature map (where things are) where
the classifier has strided convolutions and global average pooling (translation-invariant), BatchNorm and ReLU
where it has GroupNorm and SiLU, other kernel sizes and widths (no parameter of the same shape).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import Reward
from rewards.registry import register_reward
from rewards.shapes.classifier import MATCH, Prediction, Reader, Typical
from rewards.shapes.world import COLORS, MAX_COUNT, RESOLUTION, SHAPES
from rewards.transforms import resize
from rewards.weights import MAIN, WeightsArg

JUDGE_WEIGHTS_FILE = Path(__file__).parent / "judge.safetensors"
"""The shipped weights (trained by ``python -m finetune.world.train judge``)."""
HEADS = (MAX_COUNT + 1, len(COLORS), len(SHAPES), 1)
"""Outputs of the fused head: count logits, colour logits, kind logits, size logit."""


def _stage(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
    )


class ShapesJudge(nn.Module):
    """Max-pooling CNN on 32x32 images in [0, 1]: three stages (5x5 then 3x3 convolutions, BatchNorm, ReLU, 2x2
    max pooling: 32 -> 16 -> 8 -> 4 px), the 4x4 map flattened (where things are, not only what) into an MLP, one
    fused linear head."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96), hidden: int = 160) -> None:
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(_stage(3, a, 5), _stage(a, b, 3), _stage(b, c, 3))
        side = RESOLUTION // 8
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, sum(HEADS))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The MLP's features [N, hidden] of images in [0, 1] (what the head reads)."""
        if images.shape[-2:] != (RESOLUTION, RESOLUTION):
            images = resize(images, (RESOLUTION, RESOLUTION), "bilinear")
        return self.mlp(self.features(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> Prediction:
        count, color, shape, size = self.head(self.embed(images)).split(HEADS, dim=1)
        return Prediction(
            count=F.log_softmax(count, 1),
            color=F.log_softmax(color, 1),
            shape=F.log_softmax(shape, 1),
            size=torch.sigmoid(size)[:, 0],
        )


TYPICAL: Typical = {
    # objective: (typical range, (mean, std) normalisation), measured as for ``shapes`` on the shipped pipeline's
    # samples of all 36 captions x 8 seeds (``python -m finetune.world.judge`` prints them; 5th-95th percentiles;
    # color and shape with one target, red and circle).
    "prompt": ((-1.1, 0.0), (-0.21, 0.79)),
    "count": ((1.0, 3.0), (2.0, 0.82)),
    "color": ((-17.0, 0.0), (-9.3, 5.8)),
    "shape": ((-16.0, 0.0), (-6.6, 5.3)),
    "size": ((0.1, 0.81), (0.42, 0.22)),
    MATCH: ((0.0, 1.0), (0.93, 0.26)),  # the share of samples read as their caption, and its spread
}
JUDGE = Reader(ShapesJudge, JUDGE_WEIGHTS_FILE, "python -m finetune.world.train judge", TYPICAL)
"""The ``shapes-judge`` and ``shapes-judge-match`` rewards' model."""


@register_reward("shapes-judge", components=(MAIN,))
def shapes_judge(
    pretrained: bool = True,
    weights: dict[str, WeightsArg] | None = None,
    objective: str | None = None,
    mode: str | None = None,
    target: str | None = None,
) -> Reward:
    """Independent shapes-world judge (another network, seed and data than `shapes`): the objectives of `shapes`."""
    return JUDGE.reward("shapes-judge", pretrained, weights, objective, mode, target)


@register_reward("shapes-judge-match", components=(MAIN,), differentiable=False)
def shapes_judge_match(pretrained: bool = True, weights: dict[str, WeightsArg] | None = None) -> Reward:
    """Independent shapes-world judge: 1 if its reading (count, colour, kind) is exactly the prompt's, else 0."""
    return JUDGE.match("shapes-judge-match", pretrained, weights)
