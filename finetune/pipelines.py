"""Stable Diffusion pipelines for fine-tuning: load one, check it is SD-1.x/2.x compatible, or build a random one.

Pipelines are diffusers' own ``StableDiffusionPipeline`` objects. ``build_random_pipeline`` makes one with random
weights at a named size, with no download (the tokenizer is rebuilt from the BPE vocabulary that open_clip
ships), for tests and for users without weights; it can be ``save_pretrained`` and loaded back like any model.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

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
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        resolution=512,
    ),
}


def build_random_pipeline(size: str = "tiny", seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised SD-1.x-architecture pipeline of a named size (``tiny``, ``small`` or ``sd15``)."""
    if size not in PIPELINE_SIZES:
        raise ValueError(f"unknown pipeline size {size!r}; choose from {', '.join(PIPELINE_SIZES)}")
    spec = PIPELINE_SIZES[size]
    torch.manual_seed(seed)
    vae_blocks = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        sample_size=spec["resolution"],
        **spec["vae"],
    )
    latent_size = spec["resolution"] // 2 ** (vae_blocks - 1)
    unet = UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4, **spec["unet"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **spec["text"])
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(model: str | os.PathLike, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load a diffusers Stable Diffusion pipeline from a hub id or a local ``save_pretrained`` directory, without
    the safety checker, with a DDIM scheduler built from its own scheduler configuration."""
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            str(model), dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"cannot load a Stable Diffusion pipeline from {str(model)!r}: it is neither a local diffusers "
            f"directory (with model_index.json) nor a reachable, cached hub id. On a machine with access run "
            f"`hf download {model} --local-dir DIR` and pass --model DIR. (diffusers said: {reason})"
        ) from err
    check_pipeline(pipeline)
    return pipeline


def check_pipeline(pipeline: object) -> None:
    """Raise ``ValueError`` unless ``pipeline`` is an SD-1.x/2.x-style text-to-image pipeline this trainer supports,
    and switch its scheduler to DDIM (same noise schedule)."""
    if not isinstance(pipeline, StableDiffusionPipeline):
        raise ValueError(
            f"expected a diffusers StableDiffusionPipeline (SD 1.x/2.x); got {type(pipeline).__name__}. "
            f"SDXL and other architectures are not supported yet."
        )
    unet_config = pipeline.unet.config
    if unet_config.in_channels != 4 or unet_config.get("addition_embed_type") is not None:
        raise ValueError(
            "the pipeline's UNet is not an SD-1.x/2.x text-to-image UNet (4 latent input channels, no added "
            "embeddings); inpainting, depth and SDXL UNets are not supported"
        )
    if unet_config.cross_attention_dim != pipeline.text_encoder.config.hidden_size:
        raise ValueError(
            f"UNet cross-attention width {unet_config.cross_attention_dim} does not match the text encoder's "
            f"hidden size {pipeline.text_encoder.config.hidden_size}"
        )
    if not isinstance(pipeline.scheduler, DDIMScheduler):
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
