"""PickScore: a CLIP-H model fine-tuned on Pick-a-Pic human preferences (yuvalkirstain/PickScore_v1).

Score = ``exp(logit_scale) * cosine(image embedding, prompt embedding)`` with the checkpoint's own logit scale
(about 100 for trained CLIP-H, so scores read as 100 x cosine; SD 1.5 samples sit near 20.5-22).
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel

from rewards.base import Reward
from rewards.clip import build_clip_tokenizer
from rewards.registry import register_reward
from rewards.text import TokenizerPrompts
from rewards.transforms import CLIP_224
from rewards.weights import MAIN, WeightsArg, WeightSource, build_model

PICKSCORE_SOURCE = WeightSource(
    repo_id="yuvalkirstain/PickScore_v1", revision="a4e4367c6dfa7288a00c550414478f865b875800"
)
VISION_VIT_H_14 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    hidden_act="gelu",  # not the transformers default (quick_gelu): a default config computes wrong features
    layer_norm_eps=1e-5,
)
TEXT_VIT_H_14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)


def pickscore_config(tiny: bool = False) -> CLIPConfig:
    """LAION CLIP-H/14 geometry (PickScore_v1), or a 2-layer, 32-wide variant for tests."""
    vision, text, projection = dict(VISION_VIT_H_14), dict(TEXT_VIT_H_14), 1024
    if tiny:
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision, text, projection = {**vision, **small}, {**text, **small}, 32
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection)


class CLIPPreferenceReward(Reward):
    """``exp(logit_scale) * cos(image, prompt)`` under a transformers CLIPModel (PickScore's recipe)."""

    name = "pickscore"
    needs_prompts = True
    input_size = 224
    typical_range = (20.5, 22.0)
    normalization = (21.0, 0.5)

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model
        self.prompt_processor = TokenizerPrompts.of(build_clip_tokenizer(), max_length=77)
        self.freeze()

    def encode_prompts(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.model.get_text_features(input_ids=inputs["input_ids"])
        features = getattr(features, "pooler_output", features)
        return {"text": features / features.norm(dim=-1, keepdim=True)}

    def score_encoded(self, images: torch.Tensor, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        features = self.model.get_image_features(pixel_values=CLIP_224(images))
        features = getattr(features, "pooler_output", features)
        image = features / features.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (image * encoded["text"].to(image.dtype)).sum(dim=-1)


@register_reward("pickscore", components=(MAIN,))
def pickscore(pretrained: bool = True, weights: dict[str, WeightsArg] | None = None, tiny: bool = False) -> Reward:
    """PickScore v1 (CLIP-H/14 tuned on Pick-a-Pic preferences): 100 x cosine(image, prompt); needs prompts."""
    model = build_model(
        CLIPModel,
        pickscore_config(tiny),
        reward="pickscore",
        component=MAIN,
        source=PICKSCORE_SOURCE,
        pretrained=pretrained,
        override=(weights or {}).get(MAIN),
        tiny=tiny,
    )
    return CLIPPreferenceReward(model)
