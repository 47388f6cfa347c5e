"""HPSv2 and HPSv2.1 (Human Preference Score): open_clip ViT-H/14 fine-tuned on HPD human preferences.

Score = cosine(image embedding, prompt embedding), no logit scale (benchmarks print it x100). The reference
preprocessing resizes the longer side to 224 and zero-pads to a square (for square images: a resize to 224).
"""

from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer

from rewards.base import Reward
from rewards.registry import register_reward
from rewards.text import PromptProcessor
from rewards.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize_longer_side_and_pad
from rewards.weights import (
    MAIN,
    WeightsArg,
    WeightSource,
    load_state_dict_strict,
    needs_weights,
    read_state_dict,
    resolve,
    uninitialised,
)

HPS_REPO, HPS_REVISION = "xswu/HPSv2", "697403c78157020a1ae59d23f111aa58ced35b0a"
SOURCES = {
    "hpsv2": WeightSource(repo_id=HPS_REPO, filename="HPS_v2_compressed.pt", revision=HPS_REVISION),
    "hpsv2.1": WeightSource(repo_id=HPS_REPO, filename="HPS_v2.1_compressed.pt", revision=HPS_REVISION),
}
VIT_H_14 = dict(
    embed_dim=1024,
    vision_cfg=dict(image_size=224, layers=32, width=1280, head_width=80, patch_size=14),
    text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24),
)
"""open_clip's ``model_configs/ViT-H-14.json`` (no quick_gelu: exact GELU)."""


def vit_h_14(tiny: bool = False) -> dict:
    """The ViT-H/14 open_clip configuration, or a 2-layer, 32-wide variant for tests."""
    if not tiny:
        return VIT_H_14
    return dict(
        embed_dim=32,
        vision_cfg=dict(image_size=224, layers=2, width=32, head_width=16, patch_size=14),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    )


class OpenClipPrompts(PromptProcessor):
    """open_clip's own CLIP tokenizer (text cleaning with ftfy, BPE, padded with 0), as the HPS reference uses it;
    open_clip ships its vocabulary, so only the context length is stored."""

    kind = "open_clip"

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length
        self.tokenizer = SimpleTokenizer(context_length=context_length)

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(prompts)}

    def to_json(self) -> dict:
        return {"context_length": self.context_length}

    @classmethod
    def from_json(cls, data: dict) -> OpenClipPrompts:
        return cls(int(data["context_length"]))


class HPSReward(Reward):
    """cos(image, prompt) under an open_clip CLIP model (the HPS recipe)."""

    name = "hpsv2"
    needs_prompts = True
    input_size = 224

    def __init__(self, model: CLIP, typical_range: tuple[float, float], normalization: tuple[float, float]) -> None:
        super().__init__()
        self.model = model
        self.typical_range, self.normalization = typical_range, normalization
        self.prompt_processor = OpenClipPrompts(model.context_length)
        self.freeze()

    def encode_prompts(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"text": self.model.encode_text(inputs["input_ids"], normalize=True)}

    def score_encoded(self, images: torch.Tensor, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        x = normalize(resize_longer_side_and_pad(images, 224), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        image = self.model.encode_image(x, normalize=True)
        return (image * encoded["text"].to(image.dtype)).sum(dim=-1)


def _build(name: str, pretrained: bool, weights: dict, tiny: bool, typical, normalization) -> Reward:
    override = weights.get(MAIN)
    state = None
    if needs_weights(name, pretrained, override, tiny):  # find the weights before building a 986M-parameter model
        path = resolve(name, MAIN, SOURCES[name], override)
        state = read_state_dict(path, nested_key="state_dict")
    if state is None:
        model = CLIP(**vit_h_14(tiny))
    else:
        model = uninitialised(CLIP, **vit_h_14(tiny))
        load_state_dict_strict(model, state, f"checkpoint {path} for '{name}'")
    return HPSReward(model, typical, normalization)


@register_reward("hpsv2", components=(MAIN,))
def hpsv2(pretrained: bool = True, weights: dict[str, WeightsArg] | None = None, tiny: bool = False) -> Reward:
    """HPSv2 (open_clip ViT-H/14 tuned on human preferences): cosine(image, prompt), ~0.27 on SD 1.x; needs prompts."""
    return _build("hpsv2", pretrained, weights or {}, tiny, (0.26, 0.28), (0.27, 0.01))


@register_reward("hpsv2.1", components=(MAIN,))
def hpsv2_1(pretrained: bool = True, weights: dict[str, WeightsArg] | None = None, tiny: bool = False) -> Reward:
    """HPSv2.1 (retrained HPSv2): cosine(image, prompt), ~0.24-0.26 on SD 1.x; needs prompts."""
    return _build("hpsv2.1", pretrained, weights or {}, tiny, (0.24, 0.26), (0.25, 0.01))
