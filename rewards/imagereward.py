"""ImageReward (THUDM/ImageReward v1.0): BLIP ViT-L/16 image encoder, a BERT-base text encoder that cross-attends
to the image, and an MLP head on the [CLS] state of the cross-attended text.

Score = ``(mlp(cls) - 0.16717362830052426) / 1.0333394966054072`` (the reference's z-scoring; SD 1.5 samples sit
near -0.2..0.2). Built on transformers' ``BlipVisionModel`` and ``BlipTextModel``; the reference checkpoint
(``ImageReward.pt``: ``blip.visual_encoder.*`` timm-style ViT, ``blip.text_encoder.*`` BERT names, ``mlp.layers.*``)
is renamed by :func:`convert_reference_state_dict` and loaded strictly, skipping only
:data:`IGNORED_REFERENCE_KEYS`.

Text: the ``bert-base-uncased`` WordPiece tokenizer plus BLIP's ``[DEC]`` and ``[ENC]`` special tokens (vocabulary
30,524), ``padding="max_length"``, ``max_length=35``, truncation. The reference feeds the tokenizer's ids as they
are, starting with ``[CLS]``, in scoring, ReFL and training alike (``ImageReward/ImageReward.py``,
``train/src/ImageReward.py``); ``enc_token_id`` is set by ``init_tokenizer`` but never used, so the first token is
not replaced by ``[ENC]`` here either (BLIP's own ITM head does replace it; ImageReward does not).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from rewards.aesthetic import AestheticMLP
from rewards.base import Reward
from rewards.registry import register_reward
from rewards.text import TokenizerPrompts
from rewards.transforms import CLIP_224
from rewards.weights import (
    MissingWeightsError,
    WeightsArg,
    WeightsMismatchError,
    WeightSource,
    load_state_dict_strict,
    needs_weights,
    read_state_dict,
    resolve,
    uninitialised,
)

NAME = "imagereward"
MODEL, TOKENIZER = "model", "tokenizer"
# Not pinned: no commit id of THUDM/ImageReward could be confirmed without network access; weights=
# "THUDM/ImageReward@REVISION" pins one.
IMAGEREWARD_SOURCE = WeightSource(repo_id="THUDM/ImageReward", filename="ImageReward.pt")
TOKENIZER_SOURCE = WeightSource(
    repo_id="bert-base-uncased", filename="vocab.txt", revision="86b5e0934494bd15c9632b12f734a8a67f723594"
)
"""The reference calls ``BertTokenizer.from_pretrained('bert-base-uncased')``; only its ``vocab.txt`` is needed
(lower-casing, accent stripping and Chinese-character splitting are BertTokenizer's defaults, as in that repo)."""

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
SPECIAL_TOKENS = ("[DEC]", "[ENC]")
"""Added by BLIP's ``init_tokenizer`` as ``bos_token`` and an additional special token (ids 30522 and 30523 with
the bert-base-uncased vocabulary). Kept so that prompts containing them tokenize as in the reference."""

VISION_VIT_L_16 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=16,
    image_size=224,
    hidden_act="gelu",
    layer_norm_eps=1e-6,  # timm's ViT; the BlipVisionConfig default (1e-5) computes slightly different features
    initializer_range=0.02,  # random init as timm's (the default 1e-10 leaves random models blind to the image)
)
"""BLIP ``create_vit('large', 224)``: timm-style ViT-L/16, exact GELU, pre-norm blocks, final LayerNorm."""

TEXT_BERT_BASE = dict(
    vocab_size=30524,  # bert-base-uncased (30,522) + [DEC] + [ENC]
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,  # the BlipTextConfig default is 8: same shapes, different scores
    max_position_embeddings=512,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    pad_token_id=0,
    encoder_hidden_size=1024,  # cross-attention keys/values read the ViT-L width (the default is 768)
    is_decoder=True,  # only makes transformers build the cross-attention blocks; forward uses is_decoder=False
)
"""``med_config.json`` of THUDM/ImageReward (BERT-base with ``add_cross_attention``, ``encoder_width`` 1024)."""

TINY_VISION = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, encoder_hidden_size=48
)

IGNORED_REFERENCE_KEYS = frozenset(
    {
        "blip.vision_proj.weight",  # BLIP's contrastive projections: unused by ImageReward's score
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",  # a constant arange buffer (non-persistent in transformers)
    }
)
"""The only reference keys that are not loaded (they may also be absent). Every other key must map onto a tensor
of this module with the same shape, and every tensor of this module must be given."""

KEY_RENAMES = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),  # (1, 1, D) both
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),  # (1, 197, D) both
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{n}.norm1.", "vision.encoder.layers.{n}.layer_norm1."),
    ("blip.visual_encoder.blocks.{n}.attn.qkv.", "vision.encoder.layers.{n}.self_attn.qkv."),  # fused in both
    ("blip.visual_encoder.blocks.{n}.attn.proj.", "vision.encoder.layers.{n}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{n}.norm2.", "vision.encoder.layers.{n}.layer_norm2."),
    ("blip.visual_encoder.blocks.{n}.mlp.fc1.", "vision.encoder.layers.{n}.mlp.fc1."),
    ("blip.visual_encoder.blocks.{n}.mlp.fc2.", "vision.encoder.layers.{n}.mlp.fc2."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.text_encoder.", "text."),  # BlipTextModel keeps BLIP's med.py (BERT) names
    ("mlp.layers.", "mlp.layers."),
)
"""(reference name, this module's name). A name ending in "." is a prefix (the rest is kept), others are whole
keys; ``{n}`` is a block index."""

TEST_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    + ["an", "the", "of", "in", "on", "with", "and", "photo", "painting", "oil", "red", "cat", "dog", "car"]
)
"""A small WordPiece vocabulary (special tokens, characters, continuation pieces, a few words) used when the model
has random weights and no tokenizer is given, so that tests and random-weight builds need no download. Any
lower-case ASCII prompt tokenizes into distinct pieces; it is not the reference vocabulary."""


@functools.cache
def _rule(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(re.escape("{n}"), r"(?P<n>\d+)")
    return re.compile(f"^{body}(?P<rest>.+)$" if pattern.endswith(".") else f"^{body}$")


def _rename(key: str, forward: bool) -> str | None:
    for reference, ours in KEY_RENAMES:
        source, target = (reference, ours) if forward else (ours, reference)
        match = _rule(source).match(key)
        if match:
            groups = match.groupdict()
            return target.replace("{n}", groups.get("n") or "") + (groups.get("rest") or "")
    return None


def from_reference_key(key: str) -> str | None:
    """This module's name for a reference checkpoint key, or ``None`` if no rule maps it."""
    return _rename(key, forward=True)


def to_reference_key(key: str) -> str:
    """The reference checkpoint's name for one of this module's state-dict keys."""
    name = _rename(key, forward=False)
    if name is None:
        raise KeyError(f"no reference name for {key!r}")
    return name


def convert_reference_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a THUDM ``ImageReward.pt`` state dict to this module's names, dropping :data:`IGNORED_REFERENCE_KEYS`.

    Keys no rule maps raise :class:`WeightsMismatchError` (completeness and shapes are checked by the loader)."""
    converted, unmapped = {}, []
    for key, value in state.items():
        if key in IGNORED_REFERENCE_KEYS:
            continue
        name = from_reference_key(key)
        if name is None:
            unmapped.append(key)
        else:
            converted[name] = value
    if unmapped:
        raise WeightsMismatchError(f"keys with no ImageReward mapping: {', '.join(sorted(unmapped)[:6])}")
    return converted


class _ReferenceLayout:
    """``module`` seen under the reference key names, so that the project's strict loader checks the checkpoint
    and names missing, unexpected or mis-shaped keys the way they are spelled in ``ImageReward.pt``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {to_reference_key(k): v for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> object:
        return self.module.load_state_dict(convert_reference_state_dict(state), strict=strict)


def load_reference_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a reference-layout state dict into an :class:`ImageRewardModel` strictly (names and shapes), skipping
    exactly :data:`IGNORED_REFERENCE_KEYS`."""
    load_state_dict_strict(_ReferenceLayout(module), dict(state), what, ignore=sorted(IGNORED_REFERENCE_KEYS))


def imagereward_config(tiny: bool = False) -> tuple[BlipVisionConfig, BlipTextConfig]:
    """The reference geometry (ViT-L/16 at 224 + BERT-base with cross-attention), or a 2-layer variant for tests
    (vision 48 wide, text 32 wide, the real vocabulary size so that any BERT tokenizer fits)."""
    vision, text = dict(VISION_VIT_L_16), dict(TEXT_BERT_BASE)
    if tiny:
        vision, text = {**vision, **TINY_VISION}, {**text, **TINY_TEXT}
    return BlipVisionConfig(**vision), BlipTextConfig(**text)


def build_tokenizer(vocab: Path | None = None) -> BertTokenizer:
    """BLIP's tokenizer: a lower-casing WordPiece ``BertTokenizer`` over ``vocab`` (a ``vocab.txt`` file or a
    directory holding one; ``None``: :data:`TEST_VOCAB`) plus the ``[DEC]`` and ``[ENC]`` special tokens."""
    if vocab is None:
        tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(TEST_VOCAB)})
    else:
        path = vocab / "vocab.txt" if vocab.is_dir() else vocab
        if not path.is_file():
            raise MissingWeightsError(f"no vocab.txt in {vocab} (the tokenizer of '{NAME}' needs bert-base-uncased's)")
        try:
            tokenizer = BertTokenizer(vocab=str(path))
        except Exception as err:  # e.g. a checkpoint passed as the tokenizer: not UTF-8 text
            raise WeightsMismatchError(f"{path} is not a WordPiece vocabulary (vocab.txt): {err}") from err
    tokenizer.add_special_tokens({"bos_token": SPECIAL_TOKENS[0]})
    tokenizer.add_special_tokens({"additional_special_tokens": [SPECIAL_TOKENS[1]]})
    return tokenizer


class ImageRewardModel(Reward):
    """``(mlp(BERT_cross(prompt, ViT(image))[CLS]) - mean) / std`` with transformers' BLIP modules."""

    name = NAME
    needs_prompts = True
    input_size = 224
    typical_range = (-0.2, 0.2)
    normalization = (0.0, 1.0)
    """The output is already z-scored with the reference's own statistics (``mean``/``std`` in ImageReward.py)."""

    def __init__(self, vision: BlipVisionModel, text: BlipTextModel, tokenizer: BertTokenizer) -> None:
        super().__init__()
        if len(tokenizer) > text.config.vocab_size:
            raise WeightsMismatchError(
                f"reward '{NAME}': the tokenizer has {len(tokenizer)} tokens but the text encoder only "
                f"{text.config.vocab_size} embeddings; use bert-base-uncased's vocab.txt"
            )
        self.vision = vision
        self.text = text
        self.mlp = AestheticMLP(text.config.hidden_size)  # the same 5-Linear, no-ReLU head (mlp.layers.{0,2,4,6,7})
        # Only tokens are cached per prompt (encode_prompts is the identity): the text attends to the image.
        self.prompt_processor = TokenizerPrompts.of(tokenizer, MAX_LENGTH, ("input_ids", "attention_mask"))
        self.freeze()

    def score_encoded(self, images: torch.Tensor, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=CLIP_224(images)).last_hidden_state  # after the final LayerNorm
        text = self.text(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            encoder_hidden_states=image_embeds,  # every image token is attended to (the reference's all-ones mask)
            is_decoder=False,  # bidirectional self-attention, as BLIP's BertModel in multimodal mode
        )
        reward = self.mlp(text.last_hidden_state[:, 0]).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        for name in (IMAGEREWARD_SOURCE.filename, "ImageReward.safetensors"):
            if (path / name).is_file():
                return path / name
        raise MissingWeightsError(f"no {IMAGEREWARD_SOURCE.filename} in directory {path} (reward '{NAME}')")
    return path


@register_reward(NAME, components=(MODEL, TOKENIZER), sources={MODEL: IMAGEREWARD_SOURCE, TOKENIZER: TOKENIZER_SOURCE})
def imagereward(pretrained: bool = True, weights: dict[str, WeightsArg] | None = None, tiny: bool = False) -> Reward:
    """ImageReward v1.0 (BLIP ViT-L/16 + cross-attending BERT, MLP head): z-scored preference; needs prompts."""
    weights = weights or {}
    model_override, vocab_override = weights.get(MODEL), weights.get(TOKENIZER)
    checkpoint = None
    if needs_weights(NAME, pretrained, model_override, tiny):  # find every file before building a 447M model
        checkpoint = _checkpoint_file(resolve(NAME, MODEL, IMAGEREWARD_SOURCE, model_override))
    # Trained weights need the reference vocabulary; a random model gets the offline test vocabulary unless given one.
    vocab = None
    if checkpoint is not None or vocab_override is not None:
        vocab = resolve(NAME, TOKENIZER, TOKENIZER_SOURCE, vocab_override)
    tokenizer = build_tokenizer(vocab)
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    vision_config, text_config = imagereward_config(tiny)

    def build() -> ImageRewardModel:
        return ImageRewardModel(
            BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False), tokenizer
        )

    if state is None:
        return build()
    reward = uninitialised(build)
    load_reference_state_dict(reward, state, f"checkpoint {checkpoint} for '{NAME}' component '{MODEL}'")
    return reward
