"""Train the shapes-world classifier behind the ``shapes`` reward (seeded, a few minutes on 2 CPU cores).

Images are rendered on the fly and degraded at random (blur, noise, a colour and brightness jitter) so that the
classifier also reads the slightly soft, off-colour images a small diffusion model generates.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from compose.files import atomic_write
from rewards.shapes.classifier import ShapesClassifier
from rewards.shapes.world import Batch, sample_batch

EMPTY_FRACTION = 0.15
"""Share of empty scenes (count 0) so that the count head knows "no shapes" (object removal)."""


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, per-image colour gain and offset, and pixel noise, clamped to [0, 1]."""
    n = len(images)
    sigma = torch.rand(n, generator=generator) * 1.0
    blurred = torch.stack([_blur(image, float(s)) for image, s in zip(images, sigma, strict=True)])
    gain = 1 + 0.15 * (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1)
    offset = 0.06 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    noise = 0.03 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    return (blurred * gain + offset + noise).clamp(0, 1)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.3:
        return image
    x = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    kernel2d = (kernel[:, None] * kernel[None, :]).expand(3, 1, 5, 5)
    return F.conv2d(F.pad(image[None], (2, 2, 2, 2), mode="replicate"), kernel2d, groups=3)[0]


def loss_and_accuracy(model: ShapesClassifier, batch: Batch, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Summed head losses (colour, kind and size only where there are shapes) and exact-match accuracy."""
    prediction = model(images)
    present = batch.count > 0
    loss = F.nll_loss(prediction.count, batch.count)
    loss = loss + F.nll_loss(prediction.color[present], batch.color[present])
    loss = loss + F.nll_loss(prediction.shape[present], batch.shape[present])
    loss = loss + 10 * F.mse_loss(prediction.size[present], batch.size[present])
    count, color, shape = prediction.labels()
    correct = (count == batch.count) & (~present | ((color == batch.color) & (shape == batch.shape)))
    return loss, correct.float().mean().item()


def train_classifier(output: Path, steps: int = 500, batch_size: int = 128, seed: int = 0) -> dict:
    """Train from scratch, write ``output`` (safetensors, atomically) and return held-out metrics."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ShapesClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    progress = tqdm(range(steps), desc="classifier", unit="step")
    for _ in progress:
        batch = sample_batch(batch_size, rng, EMPTY_FRACTION)
        loss, accuracy = loss_and_accuracy(model, batch, degrade(batch.images, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
    model.eval()
    held_out = sample_batch(1000, random.Random(seed + 10_000), EMPTY_FRACTION)
    with torch.no_grad():
        _, clean = loss_and_accuracy(model, held_out, held_out.images)
        _, degraded = loss_and_accuracy(model, held_out, degrade(held_out.images, torch.Generator().manual_seed(1)))
        size_error = (model(held_out.images).size - held_out.size)[held_out.count > 0].abs().mean().item()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(output, lambda tmp: save_file(state, str(tmp)))
    return {
        "held_out_accuracy": clean,
        "held_out_accuracy_degraded": degraded,
        "size_mean_abs_error": size_error,
        "train_seconds": time.perf_counter() - start,
    }
