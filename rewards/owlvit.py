"""OWL-ViT open-vocabulary detection as a reward: add objects (``mode="add"``) or remove them (``mode="remove"``).

For a text query, each of the model's 576 box tokens (768 px input, 32 px patches) predicts a logit; its sigmoid
is the box's detection probability. The reward aggregates them per image (``rewards.detection``): a soft count
(the sum of the box probabilities; with a ``threshold``, a smooth count of the boxes above it, which tends to the
count of transformers' ``post_process_object_detection`` as the temperature goes to 0) or the maximum box
probability. ``owlvit-count`` is that count itself, hard and not differentiable (for RL methods). Several queries
(add "strawberry", keep "bowl") are separate rewards composed with weights.
"""

from __future__ import annotations

import torch
from transformers import OwlViTConfig, OwlViTForObjectDetection

from rewards import hints
from rewards.base import Reward
from rewards.clip import build_clip_tokenizer
from rewards.detection import HARD_COUNT, DetectorReward, check_soft_aggregation
from rewards.registry import register_reward
from rewards.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize
from rewards.weights import MAIN, WeightsArg, WeightSource, build_model

OWLVIT_SOURCE = WeightSource(repo_id="google/owlvit-base-patch32", revision="8ca8ee912aa922a57e6a89144189080ebc8e852e")


def owlvit_config(tiny: bool = False) -> OwlViTConfig:
    """``google/owlvit-base-patch32`` geometry (transformers' defaults; 153.2M parameters), or a 2-layer,
    32-wide variant at the same 768 px input for tests."""
    if not tiny:
        return OwlViTConfig()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return OwlViTConfig(text_config=small, vision_config=small, projection_dim=32)


class DetectionReward(DetectorReward):
    """Soft count, max probability or hard count of boxes matching ``query`` (negated for ``mode="remove"``)."""

    name = "owlvit"
    needs_prompts = False

    def __init__(
        self,
        model: OwlViTForObjectDetection,
        query: str,
        mode: str = "add",
        aggregation: str = "soft_count",
        threshold: float | None = None,
        temperature: float | None = None,
    ) -> None:
        super().__init__(mode, aggregation, threshold, temperature)
        self.check_query(query, self.name)
        self.model = model
        self.query = query
        self.input_size = model.config.vision_config.image_size
        tokenizer = build_clip_tokenizer(max_length=model.config.text_config.max_position_embeddings, pad_token="!")
        tokens = tokenizer([query], padding="max_length", truncation=True, return_tensors="pt")
        self.register_buffer("input_ids", tokens.input_ids, persistent=False)
        self.register_buffer("attention_mask", tokens.attention_mask, persistent=False)
        self.freeze()

    @staticmethod
    def check_query(query: object, name: str = "owlvit") -> None:
        """A query is a non-empty string (checked before the model is built)."""
        if not isinstance(query, str) or not query.strip():
            example = hints.usage(name, hints.options(query="strawberry", mode="add"))
            raise ValueError(f"{name} needs a text query, e.g. {example}")

    def box_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Per-box logits [B, boxes] of the query: images resized to the model's input (aspect not kept, as the
        reference processor does), OpenAI CLIP mean/std."""
        side = self.input_size
        x = normalize(resize(images, (side, side)), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        batch = images.shape[0]  # symbolic when traced (ONNX export keeps the batch dynamic)
        outputs = self.model(
            input_ids=self.input_ids.repeat(batch, 1),
            attention_mask=self.attention_mask.repeat(batch, 1),
            pixel_values=x,
        )
        return outputs.logits[..., 0]

    def box_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.box_logits(images).float())


POST_PROCESS_THRESHOLD = 0.1
"""transformers' default ``threshold`` of ``OwlViTImageProcessor.post_process_object_detection``."""


def build_owlvit(
    name: str, pretrained: bool, weights: dict[str, WeightsArg] | None, tiny: bool
) -> OwlViTForObjectDetection:
    """The detector of the reward ``name``: the reference weights, an override, or random weights."""
    return build_model(
        OwlViTForObjectDetection,
        owlvit_config(tiny),
        reward=name,
        component=MAIN,
        source=OWLVIT_SOURCE,
        pretrained=pretrained,
        override=(weights or {}).get(MAIN),
        tiny=tiny,
    )


@register_reward("owlvit", components=(MAIN,))
def owlvit(
    pretrained: bool = True,
    weights: dict[str, WeightsArg] | None = None,
    query: str | None = None,
    mode: str = "add",
    aggregation: str = "soft_count",
    threshold: float | None = None,
    temperature: float | None = None,
    tiny: bool = False,
) -> Reward:
    """OWL-ViT B/32 detection of a text query: soft count (or max) of boxes; mode='add' or 'remove'."""
    DetectionReward.check_query(query, "owlvit")
    check_soft_aggregation("owlvit", aggregation)
    return DetectionReward(
        build_owlvit("owlvit", pretrained, weights, tiny), query, mode, aggregation, threshold, temperature
    )


@register_reward("owlvit-count", components=(MAIN,), differentiable=False)
def owlvit_count(
    pretrained: bool = True,
    weights: dict[str, WeightsArg] | None = None,
    query: str | None = None,
    mode: str = "add",
    threshold: float = POST_PROCESS_THRESHOLD,
    tiny: bool = False,
) -> Reward:
    """OWL-ViT B/32 hard count: boxes of a text query above threshold (0.1), as post_process_object_detection."""
    DetectionReward.check_query(query, "owlvit-count")
    return DetectionReward(build_owlvit("owlvit-count", pretrained, weights, tiny), query, mode, HARD_COUNT, threshold)
