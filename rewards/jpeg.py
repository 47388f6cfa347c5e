"""JPEG (in)compressibility, DDPO's non-differentiable rewards: the size of the image saved as a JPEG file.

As kvablack/ddpo-pytorch (``ddpo_pytorch/rewards.py``) computes it: pixels ``round(255 x)`` clamped to uint8, saved
by PIL as JPEG at quality 95 (PIL's other defaults), the size in kB of 1,000 bytes. ``jpeg-incompressibility`` is
the size, ``jpeg-compressibility`` its negative. The encoder runs in PIL on the CPU, so the scores carry no
gradient (and there is no ONNX graph of them); they are exact.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from rewards.base import Reward, refuse_tracing
from rewards.registry import register_reward

QUALITY = 95
"""DDPO's JPEG quality."""
BYTES_PER_KB = 1000


def jpeg_sizes(images: torch.Tensor) -> torch.Tensor:
    """Size in kB of each image of a batch in [0, 1] saved as a JPEG file at :data:`QUALITY`, float32 on the
    images' device. Pixels are quantised as DDPO does: ``(255 x).round().clamp(0, 255)`` in float32, as uint8."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    sizes = []
    for array in pixels.permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=QUALITY)
        sizes.append(buffer.tell() / BYTES_PER_KB)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegSizeReward(Reward):
    """``sign`` x the JPEG size in kB: ``+1`` rewards incompressible images, ``-1`` compressible ones."""

    differentiable = False

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign
        # Measured on the embedded world pipeline's 32 x 32 samples (all 36 captions x 8 seeds; 5th-95th percentile,
        # mean, std); the size grows with the pixel count, so 512 x 512 images score about 100 times more (model card).
        low, high, mean, std = 0.82, 1.28, 1.0, 0.13
        self.typical_range = (low, high) if sign > 0 else (-high, -low)
        self.normalization = (sign * mean, std)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        refuse_tracing(self.name, "encodes images with PIL, outside torch")
        return self.sign * jpeg_sizes(images)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quality={QUALITY}, sign={self.sign:+g}"


@register_reward("jpeg-incompressibility", differentiable=False)
def jpeg_incompressibility(pretrained: bool = True, weights: dict | None = None) -> Reward:
    """Size in kB of the image saved as JPEG at quality 95 (DDPO), exact via PIL; no weights."""
    return JpegSizeReward(1.0)


@register_reward("jpeg-compressibility", differentiable=False)
def jpeg_compressibility(pretrained: bool = True, weights: dict | None = None) -> Reward:
    """Negated size in kB of the image saved as JPEG at quality 95 (DDPO), exact via PIL; no weights."""
    return JpegSizeReward(-1.0)
