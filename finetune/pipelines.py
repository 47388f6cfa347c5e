"""Text-to-image pipelines for fine-tuning: load one of a supported family, check it, or build a random one.

Pipelines are diffusers' own objects (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``); :mod:`finetune.families` says how each is sampled.
``build_random_pipeline`` makes one with random weights at a named size, with no download (the CLIP tokenizer is
rebuilt from the BPE vocabulary that open_clip ships, the T5 tokenizer from a small Unigram vocabulary), for tests
and for users without weights; it can be ``save_pretrained`` and loaded back like any model.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from compose.geometry import TRANSFORMER_CONFIGS, UNET_CONFIGS
from finetune.families import Family, family_class, family_for
from rewards.clip import build_clip_tokenizer

SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
"""``runwayml/stable-diffusion-v1-5``'s scheduler configuration (DDIM form)."""

PIPELINE_SIZES: dict[str, dict] = {
    # Unit tests: ~2M parameters, 64x64 images (8x8 latents).
    "tiny": dict(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        vae=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        resolution=64,
    ),
    # Memory and speed studies on CPU: activations dominate, 128x128 images.
    "small": dict(
        unet=dict(
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=16),
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
        resolution=128,
    ),
    # The real SD 1.5 geometry (859.5M UNet parameters), random weights: costs exactly what SD 1.5 costs.
    "sd15": dict(
        unet=UNET_CONFIGS["sd_v1"],
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        resolution=512,
    ),
}


SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)
"""``stabilityai/stable-diffusion-xl-base-1.0``'s scheduler configuration (an Euler scheduler; trained with DDIM)."""

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
"""``stabilityai/stable-diffusion-3.5-medium``'s flow-matching scheduler configuration."""

FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
"""``black-forest-labs/FLUX.1-dev``'s scheduler configuration (resolution-dependent shift)."""

FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
"""``black-forest-labs/FLUX.1-schnell``'s scheduler configuration (no shift)."""

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
TINY_T5 = dict(d_model=64, d_ff=64, d_kv=16, num_layers=1, num_heads=4, relative_attention_num_buckets=8)

FAMILY_SIZES: dict[str, dict[str, dict]] = {
    "sdxl": {
        # Unit tests: two 32-wide CLIP encoders (64-wide cross-attention), 64x64 images.
        "tiny": dict(
            unet=dict(
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,
                cross_attention_dim=64,
                norm_num_groups=8,
            ),
            vae=dict(TINY_VAE, latent_channels=4, scaling_factor=0.13025),
            text=TINY_TEXT,
            text_2=dict(TINY_TEXT, projection_dim=32),
            resolution=64,
        ),
    },
    "sd3": {
        # Unit tests: a two-block MMDiT over 2x2 patches of 16-channel latents, CLIP 32+32 wide, T5 64 wide.
        "tiny": dict(
            transformer=dict(
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=64,
                caption_projection_dim=32,
                pooled_projection_dim=64,
                pos_embed_max_size=16,
            ),
            vae=dict(
                TINY_VAE,
                latent_channels=16,
                scaling_factor=1.5305,
                shift_factor=0.0609,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            text=dict(TINY_TEXT, projection_dim=32),
            t5=TINY_T5,
            resolution=64,
        ),
    },
    "flux": {
        # Unit tests: one double and one single block over packed 16-channel latents; FLUX.1-dev-style (guidance
        # embedding, dynamic shift) or, as "tiny-schnell", FLUX.1-schnell-style (neither).
        "tiny": dict(
            transformer=dict(
                patch_size=1,
                in_channels=64,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=64,
                pooled_projection_dim=32,
                axes_dims_rope=(4, 6, 6),
                guidance_embeds=True,
            ),
            vae=dict(
                TINY_VAE,
                latent_channels=16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            text=TINY_TEXT,
            t5=TINY_T5,
            scheduler=FLUX_DEV_SCHEDULER,
            resolution=64,
        ),
    },
}
"""Random pipelines of the other families by name (``PIPELINE_SIZES`` holds SD 1.x/2.x's); the real geometries
(``base``, ``3.5-medium``, ``3.5-large``, ``dev``, ``schnell``) are for the meta device (counts, no compute)."""
FAMILY_SIZES["flux"]["small"] = dict(
    # Memory studies on CPU (benchmarks/peak_memory.py): 128-wide, 2 double + 4 single blocks over 576 tokens
    # (512 T5 + 64 image), so that the transformer's activations, not the VAE's, dominate a step; 128x128 images.
    FAMILY_SIZES["flux"]["tiny"],
    transformer=dict(
        FAMILY_SIZES["flux"]["tiny"]["transformer"],
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        axes_dims_rope=(8, 12, 12),
    ),
    vae=dict(FAMILY_SIZES["flux"]["tiny"]["vae"], block_out_channels=(32, 32, 64, 64), norm_num_groups=16),
    resolution=128,
)
FAMILY_SIZES["flux"]["tiny-schnell"] = dict(
    FAMILY_SIZES["flux"]["tiny"],
    transformer=dict(FAMILY_SIZES["flux"]["tiny"]["transformer"], guidance_embeds=False),
    scheduler=FLUX_SCHNELL_SCHEDULER,
)

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
"""OpenAI CLIP ViT-L/14's text tower (every family's first text encoder)."""
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)
"""OpenCLIP ViT-bigG/14's text tower (SDXL's and SD3's second text encoder)."""
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
)
"""T5 v1.1 XXL's encoder (SD3's third and FLUX's second text encoder)."""
REAL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
FLOW_VAE = dict(use_quant_conv=False, use_post_quant_conv=False, latent_channels=16)

FAMILY_SIZES["sdxl"]["base"] = dict(
    # stabilityai/stable-diffusion-xl-base-1.0
    unet=UNET_CONFIGS["sdxl_base_v1-0"],
    vae=dict(REAL_VAE, latent_channels=4, scaling_factor=0.13025),
    text=CLIP_L,
    text_2=CLIP_G,
    resolution=1024,
)
FAMILY_SIZES["sd3"]["3.5-medium"] = dict(
    # stabilityai/stable-diffusion-3.5-medium (MMDiT-X: dual attention in the first 13 blocks)
    transformer=TRANSFORMER_CONFIGS["sd3.5-medium"],
    vae=dict(REAL_VAE, **FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609),
    text=CLIP_L,
    text_2=CLIP_G,
    t5=T5_XXL,
    resolution=1024,
)
FAMILY_SIZES["sd3"]["3.5-large"] = dict(
    FAMILY_SIZES["sd3"]["3.5-medium"],
    # stabilityai/stable-diffusion-3.5-large
    transformer=TRANSFORMER_CONFIGS["sd3.5-large"],
)
FAMILY_SIZES["flux"]["dev"] = dict(
    # black-forest-labs/FLUX.1-dev
    transformer=TRANSFORMER_CONFIGS["flux-1-dev"],
    vae=dict(REAL_VAE, **FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159),
    text=CLIP_L,
    t5=T5_XXL,
    scheduler=FLUX_DEV_SCHEDULER,
    resolution=1024,
)
FAMILY_SIZES["flux"]["schnell"] = dict(
    FAMILY_SIZES["flux"]["dev"],
    # black-forest-labs/FLUX.1-schnell
    transformer=dict(FAMILY_SIZES["flux"]["dev"]["transformer"], guidance_embeds=False),
    scheduler=FLUX_SCHNELL_SCHEDULER,
)

T5_WORDS = (
    "a an the of in on with and at by for to from photo painting picture drawing portrait cat dog bird horse fish "
    "car house tree flower lighthouse mountain river sea sky city street red green blue yellow black white orange "
    "purple small big one two three four square circle triangle star oil watercolor"
)
"""Whole words of the test T5 vocabulary (space-separated)."""


def build_t5_tokenizer(words: str = T5_WORDS, max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer (SentencePiece-style Unigram, ``</s>`` appended, ``<pad>`` padding) over a small vocabulary
    built offline: the special tokens, the words of ``words``, then single letters and digits so that any lowercase
    text tokenizes; other characters map to ``<unk>``. For random test pipelines; no T5 checkpoint uses it."""
    space = "\u2581"  # SentencePiece's word-start marker
    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, space: -2.0}
    scores.update({space + word: -3.0 for word in words.split()})
    for char in string.ascii_lowercase + string.digits:
        scores.setdefault(space + char, -8.0)
        scores.setdefault(char, -9.0)
    return T5TokenizerFast(vocab=list(scores.items()), extra_ids=0, model_max_length=max_length)


def _scheduler(cls: type, config: dict) -> object:
    with torch.device("cpu"):  # schedulers keep their tables on the CPU, also when the models are built on meta
        return cls(**config)


def _vae(spec: dict, resolution: int) -> AutoencoderKL:
    blocks = len(spec["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        sample_size=resolution,
        **spec,
    )


def _clip(spec: dict, projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(**{"vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu", **spec})
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(spec: dict, tokenizer: T5TokenizerFast) -> T5EncoderModel:
    return T5EncoderModel(T5Config(**{"vocab_size": len(tokenizer), "feed_forward_proj": "gated-gelu", **spec}))


def _build_sd(spec: dict) -> StableDiffusionPipeline:
    vae = _vae(dict(spec["vae"], latent_channels=4), spec["resolution"])
    latent_size = spec["resolution"] // 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    unet = UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4, **spec["unet"])
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=_clip(spec["text"]),
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(DDIMScheduler, SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(spec: dict) -> StableDiffusionXLPipeline:
    vae = _vae(spec["vae"], spec["resolution"])
    latent_size = spec["resolution"] // 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_clip(spec["text"]),
        text_encoder_2=_clip(spec["text_2"], projection=True),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4, **spec["unet"]),
        scheduler=_scheduler(EulerDiscreteScheduler, SDXL_SCHEDULER),
    )


def _build_sd3(spec: dict) -> StableDiffusion3Pipeline:
    vae = _vae(spec["vae"], spec["resolution"])
    latent_size = spec["resolution"] // 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    t5_tokenizer = build_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**{**spec["transformer"], "sample_size": latent_size}),
        scheduler=_scheduler(FlowMatchEulerDiscreteScheduler, SD3_SCHEDULER),
        vae=vae,
        text_encoder=_clip(spec["text"], projection=True),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=_clip(spec.get("text_2", spec["text"]), projection=True),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5(spec["t5"], t5_tokenizer),
        tokenizer_3=t5_tokenizer,
    )


def _build_flux(spec: dict) -> FluxPipeline:
    t5_tokenizer = build_t5_tokenizer()
    return FluxPipeline(
        scheduler=_scheduler(FlowMatchEulerDiscreteScheduler, spec["scheduler"]),
        vae=_vae(spec["vae"], spec["resolution"]),
        text_encoder=_clip(spec["text"]),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=_t5(spec["t5"], t5_tokenizer),
        tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(**spec["transformer"]),
    )


BUILDERS: dict[str, tuple[dict[str, dict], Callable[[dict], DiffusionPipeline]]] = {
    "sd": (PIPELINE_SIZES, _build_sd),
    "sdxl": (FAMILY_SIZES["sdxl"], _build_sdxl),
    "sd3": (FAMILY_SIZES["sd3"], _build_sd3),
    "flux": (FAMILY_SIZES["flux"], _build_flux),
}


def build_random_pipeline(size: str = "tiny", seed: int = 0, family: str = "sd") -> DiffusionPipeline:
    """A randomly initialised pipeline of a family (``sd``, ``sdxl``, ``sd3``, ``flux``) at a named size: ``tiny``
    for each (FLUX also ``tiny-schnell``), SD's ``small``, and the real geometries (SD ``sd15``, SDXL ``base``, SD3
    ``3.5-medium`` and ``3.5-large``, FLUX ``dev`` and ``schnell``: build those under ``torch.device("meta")``
    unless there is memory for them)."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(BUILDERS)}")
    sizes, build = BUILDERS[family]
    if size not in sizes:
        raise ValueError(f"unknown pipeline size {size!r}; choose from {', '.join(sizes)}")
    torch.manual_seed(seed)
    pipeline = build(sizes[size])
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # as from_pretrained leaves them (T5's dropout off)
    return pipeline


def first_line(err: Exception) -> str:
    """The first line of an error's message, whole (a cut-off message hides the cause)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_pipeline(model: str | os.PathLike, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Load a diffusers pipeline of a supported family from a hub id or a local ``save_pretrained`` directory (the
    family from ``model_index.json``'s ``_class_name``), checked and ready to sample as training does."""
    try:
        index = DiffusionPipeline.load_config(str(model))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"cannot load a diffusers pipeline from {str(model)!r}: it is neither a local diffusers directory "
            f"(with model_index.json) nor a reachable, cached hub id. On a machine with access run "
            f"`hf download {model} --local-dir DIR` and pass --model DIR. (diffusers said: {first_line(err)})"
        ) from err
    cls = family_class(index.get("_class_name", "?"))
    try:
        pipeline = cls.pipeline_class.from_pretrained(str(model), dtype=dtype, **cls.load_kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"cannot load the {cls.pipeline_class.__name__} in {str(model)!r}: a component is missing or unreadable "
            f"(diffusers said: {first_line(err)})"
        ) from err
    check_pipeline(pipeline)
    return pipeline


def check_pipeline(pipeline: object) -> Family:
    """The family of ``pipeline``; raises ``ValueError`` naming the supported families for anything else, or for a
    variant of a supported class the family cannot sample (e.g. an inpainting UNet). DDIM families get a DDIM
    scheduler with their noise schedule."""
    return family_for(pipeline)
