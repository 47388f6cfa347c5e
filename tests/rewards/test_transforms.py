"""Differentiable preprocessing against torchvision's tensor transforms and the PIL-based CLIP processor."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from rewards.transforms import CLIP_224, center_crop, resize, resize_shortest_side


@pytest.mark.parametrize("hw", [(300, 400), (401, 299), (224, 224), (97, 150)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_and_crop_match_torchvision(hw, mode):
    x = torch.rand(2, 3, *hw)
    interpolation = InterpolationMode(mode)
    expected = TF.resize(x, [224], interpolation=interpolation, antialias=True)
    if mode == "bicubic":
        expected = expected.clamp(0, 1)
    ours = resize_shortest_side(x, 224, mode)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(center_crop(ours, 224), TF.center_crop(expected, [224, 224]), rtol=0, atol=1e-6)


def test_resize_keeps_dtype_and_gradient():
    x = torch.rand(1, 3, 64, 64, dtype=torch.bfloat16, requires_grad=True)
    y = resize(x, (32, 48))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.abs().sum() > 0


def test_crop_larger_than_image():
    with pytest.raises(ValueError, match="cannot centre-crop 224x224 from a 100x300 image"):
        center_crop(torch.rand(1, 3, 100, 300), 224)


def smooth_image(size, seed=0):
    """A photo-like (low-frequency) image, quantised to uint8 levels like a decoded file."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 8, 8, generator=generator)
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


@pytest.mark.parametrize("size", [(512, 512), (300, 400)])
def test_clip_preprocessing_close_to_the_pil_reference(size):
    """The gap to transformers' PIL-based CLIPImageProcessor is about one uint8 level (stated in model cards)."""
    from transformers import CLIPImageProcessor

    x = smooth_image(size)
    pil = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    reference = processor(images=pil, return_tensors="pt").pixel_values
    gap = (CLIP_224(x) - reference).abs()
    assert gap.max().item() < 0.03
    assert gap.mean().item() < 0.008
