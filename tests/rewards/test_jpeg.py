"""JPEG (in)compressibility against PIL run directly on the same uint8 pixels (DDPO's recipe)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import get_reward


def reference_kb(images):
    """DDPO's ``jpeg_incompressibility`` by hand: uint8 pixels from numpy, PIL JPEG quality 95, bytes / 1000."""
    pixels = np.clip(np.round(images.detach().numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)
    sizes = []
    for array in pixels.transpose(0, 2, 3, 1):
        buffer = io.BytesIO()
        Image.fromarray(array, mode="RGB").save(buffer, "JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def test_exact_size_in_kb_and_its_negative():
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 48, 64, generator=generator)
    smooth = torch.linspace(0, 1, 64).expand(2, 3, 48, 64) * torch.tensor([1.0, 0.6, 0.2]).view(1, 3, 1, 1)
    images = torch.cat([noise, smooth, torch.full((1, 3, 48, 64), 0.3)])
    expected = reference_kb(images)
    incompressibility, compressibility = get_reward("jpeg-incompressibility"), get_reward("jpeg-compressibility")
    assert torch.equal(incompressibility(images), expected)
    assert torch.equal(compressibility(images), -expected)
    assert expected[0] > expected[2] > expected[4] > 0.3, "noise is the least compressible, a flat image the most"


def test_pixels_quantise_as_ddpo_does():
    """Values a hair either side of a uint8 step land on the step DDPO's ``(255 x).round()`` gives."""
    base = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = (base * 255).floor()
    below, above = (steps + 0.49) / 255, (steps + 0.51) / 255
    reward = get_reward("jpeg-incompressibility")
    assert torch.equal(reward(below), reward(steps / 255)) and torch.equal(reward(below), reference_kb(below))
    assert torch.equal(reward(above), reference_kb(above)) and not torch.equal(reward(above), reward(below))


def test_no_gradient_but_any_input():
    reward = get_reward("jpeg-compressibility")
    assert not reward.differentiable
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    scores = reward(images)
    assert scores.dtype == torch.float32 and not scores.requires_grad and images.grad is None
    assert torch.equal(reward(images.detach().to(torch.bfloat16)), -reference_kb(images.to(torch.bfloat16).float()))
    with pytest.raises(ValueError, match=r"look like \[0, 255\]"):
        reward(images.detach() * 255)


@pytest.mark.gpu
def test_cuda_images_score_on_their_device():
    images = torch.rand(2, 3, 32, 32, device="cuda", requires_grad=True)
    scores = get_reward("jpeg-incompressibility")(images)
    assert scores.device == images.device and torch.equal(scores.cpu(), reference_kb(images.cpu()))
