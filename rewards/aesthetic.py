"""LAION aesthetic predictors: a head on L2-normalised OpenAI CLIP ViT-L/14 image embeddings.

``aesthetic`` is the improved predictor v2 (christophschuhmann/improved-aesthetic-predictor, MLP head);
``aesthetic-v1`` is LAION-AI/aesthetic-predictor's linear head. Both predict a mean human rating (1-10).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModelWithProjection

from rewards.base import Reward
from rewards.clip import CLIP_VIT_L_14, CLIP_VIT_L_14_SOURCE, build_clip_vision
from rewards.registry import register_reward
from rewards.transforms import CLIP_224
from rewards.weights import WeightsArg, WeightsMismatchError, WeightSource, load_component

EMBED_DIM = 768
"""Width of the projected CLIP ViT-L/14 image embedding that both heads read."""

V2_HEAD_SOURCE = WeightSource(
    url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/6934dd81792f086e613a121dbce43082cb8be85e/sac%2Blogos%2Bava1-l14-linearMSE.pth",
    filename="sac+logos+ava1-l14-linearMSE.pth",
    sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
    size=3_714_759,
)
V1_HEAD_SOURCE = WeightSource(
    url="https://github.com/LAION-AI/aesthetic-predictor/raw/6d122adad522ab246644d9dc1c6d7a3810ee255f/sa_0_4_vit_l_14_linear.pth",
    filename="sa_0_4_vit_l_14_linear.pth",
    sha256="2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba",
    size=4_071,
)


class AestheticMLP(nn.Module):
    """The v2 head in its reference key layout (``layers.{0,2,4,6,7}``).

    The reference code has every ReLU commented out, so in eval mode the head is an affine map.
    """

    def __init__(self, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class AestheticReward(Reward):
    """Score = head(normalize(CLIP image embedding of the CLIP-preprocessed image))."""

    name = "aesthetic"
    input_size = 224
    typical_range = (5.0, 6.0)
    normalization = (5.5, 0.5)

    def __init__(self, clip: CLIPVisionModelWithProjection, head: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.head = head
        self.freeze()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected CLIP image embeddings of images in [0, 1]."""
        features = self.clip(pixel_values=CLIP_224(images)).image_embeds
        return features / features.norm(dim=-1, keepdim=True)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.head(self.embed(images)).squeeze(-1)


def _build(
    name: str, head: nn.Module, head_source: WeightSource, pretrained: bool, weights: dict, tiny: bool
) -> AestheticReward:
    clip = build_clip_vision(
        reward=name,
        component="clip",
        geometry=CLIP_VIT_L_14,
        source=CLIP_VIT_L_14_SOURCE,
        pretrained=pretrained,
        override=weights.get("clip"),
        tiny=tiny,
    )
    width = clip.config.projection_dim
    if width != EMBED_DIM:
        raise WeightsMismatchError(
            f"reward '{name}': the CLIP checkpoint projects to {width} dimensions but the head expects {EMBED_DIM} "
            f"(OpenAI CLIP ViT-L/14, e.g. {CLIP_VIT_L_14_SOURCE.repo_id})"
        )
    load_component(
        head, reward=name, component="head", source=head_source, pretrained=pretrained, override=weights.get("head")
    )
    return AestheticReward(clip, head)


@register_reward(
    "aesthetic", components=("clip", "head"), sources={"clip": CLIP_VIT_L_14_SOURCE, "head": V2_HEAD_SOURCE}
)
def aesthetic(pretrained: bool = True, weights: dict[str, WeightsArg] | None = None, tiny: bool = False) -> Reward:
    """LAION improved aesthetic predictor v2: MLP head on CLIP ViT-L/14 embeddings, rating 1-10."""
    return _build("aesthetic", AestheticMLP(), V2_HEAD_SOURCE, pretrained, weights or {}, tiny)


@register_reward(
    "aesthetic-v1", components=("clip", "head"), sources={"clip": CLIP_VIT_L_14_SOURCE, "head": V1_HEAD_SOURCE}
)
def aesthetic_v1(pretrained: bool = True, weights: dict[str, WeightsArg] | None = None, tiny: bool = False) -> Reward:
    """LAION aesthetic predictor v1: linear head on CLIP ViT-L/14 embeddings, rating 1-10."""
    return _build("aesthetic-v1", nn.Linear(EMBED_DIM, 1), V1_HEAD_SOURCE, pretrained, weights or {}, tiny)
