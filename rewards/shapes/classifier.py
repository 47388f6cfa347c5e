"""The shapes-world classifier and the ``shapes`` reward built on it.

A small CNN trained by the project (``python -m finetune.world.train classifier``) predicts a world image's
shape count (0-3), colour, kind and size. Its outputs give the world's objectives, mirroring DRaFT's:
object addition and removal (expected count up or down), a target colour or kind, bigger or smaller shapes, and
agreement with the prompt (log-probability of the caption's count, colour and kind). ``shapes-match`` is the hard
form of that agreement: 1 if the classifier's reading matches the caption exactly, else 0 (not differentiable).
The objectives are written once (:class:`ShapesReward`) for any network that reads a :class:`Prediction`; a
:class:`Reader` names one such network and its shipped weights (this classifier, and the independent judge of
``rewards.shapes.judge``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewards import hints
from rewards.base import Reward
from rewards.registry import register_reward
from rewards.shapes.world import COLORS, MAX_COUNT, RESOLUTION, SHAPES, parse_caption
from rewards.text import PromptProcessor
from rewards.transforms import resize
from rewards.weights import MAIN, WeightsArg, WeightSource, load_component

WEIGHTS_FILE = Path(__file__).parent / "classifier.safetensors"
"""The shipped weights (trained by ``python -m finetune.world.train classifier``)."""
OBJECTIVES = ("prompt", "count", "color", "shape", "size")
"""The objectives of the ``shapes`` reward (all differentiable)."""
MATCH = "match"
"""The objective of ``shapes-match``: the exact agreement with the prompt, hard (a reward of its own name, because
a registered name is differentiable or not whatever its options)."""
PROMPTED = ("prompt", MATCH)
MODES = {"count": ("add", "remove"), "size": ("grow", "shrink")}
"""Directions of the objectives that have one (the first is the default)."""
MEAN, STD = 0.5, 0.25


@dataclass
class Prediction:
    """Per-head outputs for a batch: log-probabilities (count, color, shape) and size in [0, 1]."""

    count: torch.Tensor
    color: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor

    def labels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Most likely (count, color index, shape index) per image."""
        return self.count.argmax(1), self.color.argmax(1), self.shape.argmax(1)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ShapesClassifier(nn.Module):
    """CNN on 32x32 images in [0, 1]: three stages (32, 16, 8 px), global average pooling, four heads."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w, 1),
            _block(w, w, 1),
            _block(w, 2 * w, 2),
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2),
            _block(4 * w, 4 * w, 1),
        )
        self.count = nn.Linear(4 * w, MAX_COUNT + 1)
        self.color = nn.Linear(4 * w, len(COLORS))
        self.shape = nn.Linear(4 * w, len(SHAPES))
        self.size = nn.Linear(4 * w, 1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features [N, 4 * width] of images in [0, 1] (what the heads read)."""
        if images.shape[-2:] != (RESOLUTION, RESOLUTION):
            images = resize(images, (RESOLUTION, RESOLUTION), "bilinear")
        return self.features((images - MEAN) / STD).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> Prediction:
        h = self.embed(images)
        return Prediction(
            count=F.log_softmax(self.count(h), 1),
            color=F.log_softmax(self.color(h), 1),
            shape=F.log_softmax(self.shape(h), 1),
            size=torch.sigmoid(self.size(h))[:, 0],
        )


class CaptionTargets(PromptProcessor):
    """World captions as the indices the classifier's heads predict: ``count``, ``color`` and ``shape``. The
    colour and kind names are stored with it, so an exported graph reads its indices as they were trained."""

    kind = "shapes-caption"
    example = "two red circles"

    def __init__(self, colors: tuple[str, ...] = tuple(COLORS), shapes: tuple[str, ...] = SHAPES) -> None:
        self.colors, self.shapes = tuple(colors), tuple(shapes)

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        parsed = [parse_caption(p) for p in prompts]
        return {
            "count": torch.tensor([n for n, _, _ in parsed]),
            "color": torch.tensor([self.colors.index(c) for _, c, _ in parsed]),
            "shape": torch.tensor([self.shapes.index(s) for _, _, s in parsed]),
        }

    def to_json(self) -> dict:
        return {"colors": list(self.colors), "shapes": list(self.shapes)}

    @classmethod
    def from_json(cls, data: dict) -> CaptionTargets:
        return cls(tuple(data["colors"]), tuple(data["shapes"]))


def caption_targets(prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, color index, shape index) tensors for world captions."""
    targets = CaptionTargets()(prompts)
    return tuple(targets[name].to(device) for name in ("count", "color", "shape"))  # type: ignore[return-value]


def label_matches(prediction: Prediction, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per image, 1.0 when the most likely count, colour and kind all equal ``targets`` (:class:`CaptionTargets`'
    index tensors), else 0.0."""
    labels = dict(zip(("count", "color", "shape"), prediction.labels(), strict=True))
    return torch.stack([labels[name] == targets[name] for name in labels]).all(0).float()


def prompt_agreement(prediction: Prediction, prompts: list[str]) -> torch.Tensor:
    """Per image, 1.0 when the classifier's most likely count, colour and kind all match the caption, else 0.0."""
    device = prediction.count.device
    return label_matches(prediction, {name: t.to(device) for name, t in CaptionTargets()(prompts).items()})


class ShapesReward(Reward):
    """One objective read off a shapes-world classifier (:class:`ShapesClassifier`, or any module that maps images
    to a :class:`Prediction` and has an ``embed``); see :func:`shapes` for the options."""

    name = "shapes"
    input_size = RESOLUTION

    def __init__(
        self,
        classifier: nn.Module,
        objective: str,
        target: str | None,
        sign: float,
        typical: Mapping[str, tuple[tuple[float, float], tuple[float, float]]],
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.objective = objective
        self.needs_prompts = objective in PROMPTED
        if self.needs_prompts:
            self.prompt_processor = CaptionTargets()
        self.differentiable = objective != MATCH
        self.sign = sign
        self.target = target
        self.typical_range, self.normalization = typical[objective]
        self.freeze()

    def score_encoded(self, images: torch.Tensor, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``prompt`` objective: log-probability of the caption's count, colour and kind; ``match``: whether the
        most likely ones are the caption's."""
        prediction = self.classifier(images)
        if self.objective == MATCH:
            return label_matches(prediction, encoded)
        heads = {"count": prediction.count, "color": prediction.color, "shape": prediction.shape}
        return sum(head.gather(1, encoded[name][:, None])[:, 0] for name, head in heads.items())

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        if self.objective in PROMPTED:
            return super().score(images, prompts)
        prediction = self.classifier(images)
        if self.objective == "count":
            counts = torch.arange(MAX_COUNT + 1, device=images.device, dtype=prediction.count.dtype)
            return self.sign * (prediction.count.exp() * counts).sum(1)
        if self.objective == "size":
            return self.sign * prediction.size
        if self.objective == "color":
            return prediction.color[:, list(COLORS).index(self.target)]
        return prediction.shape[:, SHAPES.index(self.target)]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's image features (the embedded world's feature space for diversity)."""
        return self.classifier.embed(images)

    def extra_repr(self) -> str:
        target = f", target={self.target!r}" if self.target else ""
        return f"objective={self.objective!r}{target}, sign={self.sign:+g}"


Typical = Mapping[str, tuple[tuple[float, float], tuple[float, float]]]
"""Per objective: (typical range, (mean, std) normalisation)."""


@dataclass(frozen=True)
class Reader:
    """A shapes-world classifier behind a pair of rewards (``NAME`` with the objectives, ``NAME-match``): its
    architecture, its shipped weights, the command that rebuilds them and its typical scores per objective. The
    objectives themselves (:class:`ShapesReward`) are shared by every reader."""

    model: Callable[[], nn.Module]
    weights_file: Path
    command: str
    typical: Typical

    def load(self, name: str, pretrained: bool, weights: dict[str, WeightsArg] | None) -> nn.Module:
        """The shipped weights, an override, or random weights, for the reward ``name``."""
        override = (weights or {}).get(MAIN)
        if pretrained and override is None:
            if not self.weights_file.exists():
                raise FileNotFoundError(
                    f"the shipped weights of '{name}', {self.weights_file}, are missing; reinstall the package or "
                    f"regenerate them with `{self.command}`"
                )
            override = self.weights_file
        return load_component(
            self.model(), reward=name, component=MAIN, source=WeightSource(), pretrained=pretrained, override=override
        )

    def reward(
        self,
        name: str,
        pretrained: bool,
        weights: dict[str, WeightsArg] | None,
        objective: str | None,
        mode: str | None,
        target: str | None,
    ) -> ShapesReward:
        """The reward ``name`` with one objective, its options checked (see :func:`shapes`)."""
        if objective not in OBJECTIVES:
            raise ValueError(
                f"{name} needs {hints.option('objective')} one of {OBJECTIVES} (e.g. "
                f"{hints.options(objective='count', mode='remove')} to empty a scene); got {objective!r}"
            )
        modes = MODES.get(objective, (None,))
        mode = modes[0] if mode is None else mode
        if mode not in modes:
            raise ValueError(f"objective {objective!r} takes {hints.option('mode')} one of {modes}; got {mode!r}")
        choices = {"color": tuple(COLORS), "shape": SHAPES}.get(objective)
        if choices is not None and target not in choices:
            raise ValueError(
                f"objective {objective!r} needs {hints.option('target')} one of {choices}, e.g. "
                f"{hints.options(target=choices[0])}; got {target!r}"
            )
        if choices is None and target is not None:
            raise ValueError(f"objective {objective!r} takes no target (only 'color' and 'shape' do)")
        sign = -1.0 if mode in ("remove", "shrink") else 1.0
        return ShapesReward(self.load(name, pretrained, weights), objective, target, sign, self.typical)

    def match(self, name: str, pretrained: bool, weights: dict[str, WeightsArg] | None) -> ShapesReward:
        """The hard prompt agreement ``name`` (not differentiable)."""
        return ShapesReward(self.load(name, pretrained, weights), MATCH, None, 1.0, self.typical)


TYPICAL: Typical = {
    # objective: (typical range, (mean, std) normalisation), measured on the shipped pipeline's samples of all 36
    # captions x 8 seeds (the 5th-95th percentiles; color and shape with one target, a third or a quarter match).
    "prompt": ((-1.5, 0.0), (-0.24, 0.57)),
    "count": ((1.0, 3.0), (2.0, 0.81)),
    "color": ((-8.8, 0.0), (-5.4, 3.2)),
    "shape": ((-6.0, 0.0), (-3.0, 2.1)),
    "size": ((0.12, 0.79), (0.42, 0.21)),
    MATCH: ((0.0, 1.0), (0.92, 0.27)),  # the share of samples read as their caption, and its spread
}
CLASSIFIER = Reader(ShapesClassifier, WEIGHTS_FILE, "python -m finetune.world.train classifier", TYPICAL)
"""The ``shapes`` and ``shapes-match`` rewards' classifier."""


@register_reward("shapes", components=(MAIN,))
def shapes(
    pretrained: bool = True,
    weights: dict[str, WeightsArg] | None = None,
    objective: str | None = None,
    mode: str | None = None,
    target: str | None = None,
) -> Reward:
    """Embedded shapes-world classifier: prompt agreement, add/remove shapes, colour, kind or size (no download)."""
    return CLASSIFIER.reward("shapes", pretrained, weights, objective, mode, target)


@register_reward("shapes-match", components=(MAIN,), differentiable=False)
def shapes_match(pretrained: bool = True, weights: dict[str, WeightsArg] | None = None) -> Reward:
    """Embedded shapes-world classifier: 1 if its reading (count, colour, kind) is exactly the prompt's, else 0."""
    return CLASSIFIER.match("shapes-match", pretrained, weights)
