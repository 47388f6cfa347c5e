"""Differentiable image preprocessing shared by every reward.

Reference pipelines resize with PIL, which is not differentiable. These functions do the same steps on tensors
(resize the shortest side, centre crop, normalise) so that gradients reach the pixels. Torch and PIL bicubic
kernels are close but not bit-identical; model cards state the difference where it was measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Resize NCHW images to ``size`` (H, W) with antialiasing, like PIL does.

    Computed in float32 (torch has no bicubic antialias kernel for half types on CPU) and returned in the input
    dtype. Bicubic results are clamped to [0, 1], as PIL's uint8 output is.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=size, mode=interpolation, antialias=True, align_corners=False)
    if interpolation == "bicubic":
        out = out.clamp(0.0, 1.0)
    return out.to(images.dtype)


def resize_shortest_side(images: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (rounded like torchvision)."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_hw = (size, new_long) if h <= w else (new_long, size)
    return resize(images, new_hw, interpolation)


def resize_longer_side_and_pad(
    images: torch.Tensor, size: int, fill: float = 0.0, interpolation: str = "bicubic"
) -> torch.Tensor:
    """Resize so the longer side is ``size`` (aspect kept), then pad with ``fill`` to a centred ``size`` x ``size``
    square: open_clip's ``ResizeMaxSize`` (bicubic, fill 0) and YOLO's letterbox (bilinear, fill 114/255)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    x = resize(images, (new_h, new_w), interpolation)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    return F.pad(x, (left, size - new_w - left, top, size - new_h - top), value=fill)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Crop the central ``size`` x ``size`` window (offsets rounded like torchvision's CenterCrop)."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {h}x{w} image; resize first")
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std``."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class Preprocess:
    """A reference preprocessing recipe: resize the shortest side, centre crop, normalise.

    For square inputs with ``resize == crop`` this is a single resize to ``crop`` x ``crop``.
    """

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_shortest_side(images, self.resize, self.interpolation)
        x = center_crop(x, self.crop)
        return normalize(x, self.mean, self.std)


CLIP_224 = Preprocess(resize=224, crop=224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
"""OpenAI CLIP's recipe: bicubic shortest side to 224, centre crop 224, OpenAI mean/std."""
