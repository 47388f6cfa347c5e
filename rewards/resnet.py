"""Target-class reward from an ImageNet classifier (torchvision ResNet-50): the adversarial-example setting.

The score is the log-probability (or the raw logit) of a target class, or of a set of classes aggregated with
logsumexp (the log-probability that the image is any of them, e.g. any cat). Preprocessing and class names come
from torchvision's weight recipes, so V1 and V2 each get their own resize.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import ResNet50_Weights
from torchvision.models import resnet50 as tv_resnet50

from rewards import hints
from rewards.base import Reward
from rewards.registry import register_reward
from rewards.transforms import Preprocess
from rewards.weights import MAIN, WeightsArg, WeightSource, load_component

RECIPES = {"v1": ResNet50_Weights.IMAGENET1K_V1, "v2": ResNet50_Weights.IMAGENET1K_V2}
SOURCES = {
    # timm's tv_in1k / tv2_in1k checkpoints are torchvision's state dicts, stored as safetensors.
    "v1": WeightSource(
        repo_id="timm/resnet50.tv_in1k",
        filename="model.safetensors",
        revision="78f3ecfdb38e06d9b8397f662e7ab8fee96026fa",
    ),
    # Not pinned: no commit id of timm/resnet50.tv2_in1k could be confirmed without network access.
    "v2": WeightSource(repo_id="timm/resnet50.tv2_in1k", filename="model.safetensors"),
}
CLASS_GROUPS = {"cat": tuple(range(281, 286)), "dog": tuple(range(151, 269))}
"""Named sets of ImageNet classes (0-based): domestic cats 281-285, dog breeds 151-268."""


def resolve_classes(target: int | str | Sequence[int | str], categories: Sequence[str]) -> tuple[int, ...]:
    """Class indices for a target given by index, ImageNet class name, group name, or a sequence of those."""
    if isinstance(target, (int, str)) or not isinstance(target, Sequence):
        target = [target]
    lookup: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        lookup.setdefault(c.lower(), []).append(i)
    indices: list[int] = []
    for item in target:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"target items must be class indices or names; got {item!r}")
        if isinstance(item, int):
            if not 0 <= item < len(categories):
                raise ValueError(f"target class index {item} is out of range 0..{len(categories) - 1}")
            indices.append(item)
        elif item.lower() in CLASS_GROUPS:
            indices.extend(CLASS_GROUPS[item.lower()])
        elif item.lower() in lookup:
            matches = lookup[item.lower()]
            if len(matches) > 1:
                raise ValueError(f"ImageNet class name '{item}' is ambiguous (indices {matches}); use an index")
            indices.extend(matches)
        else:
            close = difflib.get_close_matches(item.lower(), [*lookup, *CLASS_GROUPS], n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown ImageNet class '{item}'.{hint} Use a class index 0-999 or a class name.")
    if not indices:
        raise ValueError("target is empty; give at least one class")
    return tuple(dict.fromkeys(indices))


class ClassifierReward(Reward):
    """``log p(target | image)`` (or the logit) under a frozen image classifier; logsumexp over several targets."""

    name = "resnet50"
    input_size = 224
    typical_range = (-10.0, 0.0)
    normalization = (-7.0, 3.0)

    def __init__(
        self, model: nn.Module, preprocess: Preprocess, classes: Sequence[int], output: str = "logprob"
    ) -> None:
        super().__init__()
        if output not in ("logprob", "logit"):
            raise ValueError(f"output must be 'logprob' or 'logit'; got {output!r}")
        self.model = model
        self.preprocess = preprocess
        self.output = output
        self.register_buffer("classes", torch.tensor(list(classes), dtype=torch.long), persistent=False)
        if output == "logit":
            self.typical_range, self.normalization = (-5.0, 20.0), (0.0, 5.0)
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        logits = self.model(self.preprocess(images)).float()
        values = torch.log_softmax(logits, dim=-1) if self.output == "logprob" else logits
        return torch.logsumexp(values[:, self.classes], dim=-1)


@register_reward("resnet50", components=(MAIN,))
def resnet50(
    pretrained: bool = True,
    weights: dict[str, WeightsArg] | None = None,
    target: int | str | Sequence[int | str] | None = None,
    recipe: str = "v2",
    output: str = "logprob",
) -> Reward:
    """torchvision ResNet-50 ImageNet target-class log-probability (target=index, name, 'cat', or a list)."""
    if target is None:
        examples = " or ".join(hints.options(target=t) for t in (281, "tabby", "cat"))
        raise ValueError(f"resnet50 needs a target class, e.g. {examples}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}; got {recipe!r}")
    tv_weights = RECIPES[recipe]
    transform = tv_weights.transforms()
    preprocess = Preprocess(
        resize=transform.resize_size[0],
        crop=transform.crop_size[0],
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
    )
    model = tv_resnet50(weights=None)
    load_component(
        model,
        reward="resnet50",
        component=MAIN,
        source=SOURCES[recipe],
        pretrained=pretrained,
        override=(weights or {}).get(MAIN),
    )
    classes = resolve_classes(target, tv_weights.meta["categories"])
    return ClassifierReward(model, preprocess, classes, output)
