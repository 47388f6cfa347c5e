"""CLIP image towers (transformers) shared by the CLIP-based rewards: geometry, tiny test variant, loading."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from rewards.weights import WeightsArg, WeightSource, build_model

CLIP_VIT_L_14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
"""OpenAI CLIP ViT-L/14 image tower (``openai/clip-vit-large-patch14``)."""

CLIP_VIT_L_14_SOURCE = WeightSource(
    repo_id="openai/clip-vit-large-patch14", revision="32bd64288804d66eefd0ccbe215aa642df71cc41"
)

TEXT_TOWER_KEYS = ("text_model.*", "text_projection.weight", "logit_scale", "*.position_ids")
"""Keys of a full CLIPModel checkpoint that the image tower does not use (plus legacy position-id buffers)."""


def tiny_config(geometry: dict) -> dict:
    """A 2-layer, 32-wide variant of ``geometry`` with the same patch, image size and projection width, so
    heads built for the real tower fit it. Used by tests (``tiny=True``); there are no pretrained tiny weights."""
    return {**geometry, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def read_vision_config(directory: Path) -> CLIPVisionConfig:
    """The image-tower config of a transformers directory holding a CLIPModel or a CLIP vision model."""
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") == "clip":
        vision = dict(config["vision_config"])
        vision["projection_dim"] = config.get("projection_dim", vision.get("projection_dim"))
        config = vision
    return CLIPVisionConfig.from_dict(config)


def build_clip_vision(
    *,
    reward: str,
    component: str,
    geometry: dict,
    source: WeightSource,
    pretrained: bool,
    override: WeightsArg | None,
    tiny: bool = False,
) -> CLIPVisionModelWithProjection:
    """Build a CLIP image tower with projection.

    Random weights at ``geometry`` (or its tiny variant) unless ``pretrained`` or ``override`` asks for
    weights; a transformers directory brings its own ``config.json``, a single state-dict file is loaded into
    ``geometry``. Loading is strict, skipping only the text-tower keys of full CLIP checkpoints.
    """
    return build_model(
        CLIPVisionModelWithProjection,
        CLIPVisionConfig(**(tiny_config(geometry) if tiny else geometry)),
        reward=reward,
        component=component,
        source=source,
        pretrained=pretrained,
        override=override,
        tiny=tiny,
        ignore=TEXT_TOWER_KEYS,
        read_config=read_vision_config,
    )


def build_clip_tokenizer(
    max_length: int = 77, pad_token: str = "<|endoftext|>", words: Sequence[str] | None = None
) -> CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer as a transformers ``CLIPTokenizer``, built offline from the merges file that
    open_clip ships (the same vocabulary as ``openai/clip-vit-large-patch14``'s tokenizer files).

    The vocabulary is reconstructed the way OpenAI's ``SimpleTokenizer`` does: 256 byte symbols, the same with
    an end-of-word marker, one token per merge (48,894 merges), then the start and end tokens: 49,408 in all.
    ``pad_token``: Stable Diffusion pads with the end token; OWL-ViT's tokenizer pads with "!" (id 0).
    ``words``: keep only the merges these words use, in CLIP's rank order, so that they split exactly as in CLIP;
    a small vocabulary for a closed domain, in which any other text still tokenizes (into smaller pieces).
    """
    import gzip

    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    if words is not None:
        merges = _merges_used_by(words, merges)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=pad_token)


def _merges_used_by(words: Sequence[str], merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The merges that byte-pair encoding applies to ``words`` (lowest rank first, as CLIP does), in rank order."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    used: set[tuple[str, str]] = set()
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            rank, i, pair = min((ranks.get(p, len(ranks)), i, p) for i, p in enumerate(itertools.pairwise(symbols)))
            if rank == len(ranks):
                break
            used.add(pair)
            symbols[i : i + 2] = ["".join(pair)]
    return sorted(used, key=ranks.__getitem__)
