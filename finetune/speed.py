"""Speed options applied to a pipeline: attention kernel, memory format, TF32 and the compiled prefix UNet.

Each option changes how the same maths runs, never the maths; ``tests/finetune/test_speed.py`` checks that each
gives the plain path's gradients. ``benchmarks/step_breakdown.py`` measures what each one buys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0


def set_attention(pipeline: StableDiffusionPipeline, attention: str) -> None:
    """``sdpa``: ``scaled_dot_product_attention`` (fused kernels; the attention matrix is never stored for
    backward); ``eager``: softmax(QK^T)V as separate ops (the reference to compare with)."""
    processors = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}
    if attention not in processors:
        raise ValueError(f"attention must be one of {', '.join(processors)}; got {attention!r}")
    for model in (pipeline.unet, pipeline.vae):
        model.set_attn_processor(processors[attention]())


def set_channels_last(pipeline: StableDiffusionPipeline) -> None:
    """UNet and VAE convolution weights in channels-last (NHWC) layout; their outputs follow it."""
    for model in (pipeline.unet, pipeline.vae):
        model.to(memory_format=torch.channels_last)


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def compile_prefix_unet(unet: torch.nn.Module, mode: str = "default") -> Callable[..., Any]:
    """The UNet compiled for the no-grad sampling steps (fixed shapes: batch and resolution do not change).

    The compiled module shares the UNet's parameters, so LoRA updates reach it without recompiling.
    """
    return torch.compile(unet, mode=mode, dynamic=False)
