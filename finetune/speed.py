"""Speed options applied to a pipeline: attention kernel, memory format, TF32 and the compiled prefix denoiser.

Each option changes how the same maths runs, never the maths; ``tests/finetune/test_speed.py`` checks that each
gives the plain path's gradients. ``benchmarks/step_breakdown.py`` measures what each one buys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from finetune.families import Family


def set_attention(family: Family, attention: str) -> None:
    """``sdpa``: ``scaled_dot_product_attention`` (fused kernels; the attention matrix is never stored for
    backward); ``eager``: softmax(QK^T)V as separate ops (the reference to compare with). UNet families switch the
    UNet's and the VAE's processors; transformer families keep their joint-attention processors (SDPA already)
    and only the VAE's is set."""
    processors = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}
    if attention not in processors:
        raise ValueError(f"attention must be one of {', '.join(processors)}; got {attention!r}")
    if family.denoiser_name != "unet" and attention != "sdpa":
        raise ValueError(
            f"attention {attention!r} is available for UNet families only; {family.title} uses its own "
            f"joint-attention processors (SDPA): use --attention sdpa"
        )
    models = (family.denoiser, family.pipeline.vae) if family.denoiser_name == "unet" else (family.pipeline.vae,)
    for model in models:
        model.set_attn_processor(processors[attention]())


def set_channels_last(family: Family) -> None:
    """Denoiser and VAE convolution weights in channels-last (NHWC) layout; their outputs follow it."""
    for model in (family.denoiser, family.pipeline.vae):
        model.to(memory_format=torch.channels_last)


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def compile_prefix(denoiser: torch.nn.Module, mode: str = "default") -> Callable[..., Any]:
    """The denoiser compiled for the no-grad sampling steps (fixed shapes: batch and resolution do not change).

    The compiled module shares the denoiser's parameters, so LoRA updates reach it without recompiling.
    """
    return torch.compile(denoiser, mode=mode, dynamic=False)
