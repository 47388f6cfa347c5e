"""Train the shapes world's readers: the classifier behind ``shapes`` and the independent judge behind
``shapes-judge`` (seeded, a few minutes each on 2 CPU cores), with one loop and their own recipes.

Images are rendered on the fly and degraded at random (blur, noise, a colour and brightness jitter) so that the
classifier also reads the slightly soft, off-colour images a small diffusion model generates.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from compose.files import atomic_write
from rewards.shapes.classifier import ShapesClassifier
from rewards.shapes.judge import ShapesJudge
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


def loss_and_accuracy(model: nn.Module, batch: Batch, images: torch.Tensor) -> tuple[torch.Tensor, float]:
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


@dataclass(frozen=True)
class Recipe:
    """How one of the world's readers is trained: its architecture, schedule and seed streams.

    ``streams=None`` seeds the scenes with the integer seed (training) and ``seed + 10_000`` (held out), and the
    degradations with ``seed`` and 1: the ``shapes`` classifier's streams, kept as they were when its shipped
    weights were made. A name seeds every stream with the string ``"{streams}/{part}/{seed}"`` instead: Python
    hashes a string seed with SHA-512 into a key of over 512 bits (``random.seed``, version 2), which no integer
    seed below 2**512 gives, so those scenes come from other Mersenne Twister states than the classifier's.
    """

    model: Callable[[], nn.Module]
    steps: int
    lr: float
    seed: int
    streams: str | None = None

    def scenes(self, seed: int, part: str) -> random.Random:
        """The scene generator of ``part`` (``train`` or ``held-out``)."""
        if self.streams is None:
            return random.Random(seed if part == "train" else seed + 10_000)
        return random.Random(f"{self.streams}/{part}/{seed}")

    def noise(self, seed: int, part: str) -> torch.Generator:
        """The degradation generator of ``part``."""
        if self.streams is None:
            return torch.Generator().manual_seed(seed if part == "train" else 1)
        digest = hashlib.sha256(f"{self.streams}/{part}/noise/{seed}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


CLASSIFIER = Recipe(ShapesClassifier, steps=500, lr=2e-3, seed=0)
"""The ``shapes`` classifier's recipe (the shipped weights')."""
JUDGE = Recipe(ShapesJudge, steps=600, lr=2e-3, seed=1, streams="shapes-judge")
"""The ``shapes-judge`` recipe: another architecture, another seed, scene streams of its own."""


def train_classifier(
    output: Path, recipe: Recipe = CLASSIFIER, steps: int | None = None, batch_size: int = 128, seed: int | None = None
) -> dict:
    """Train ``recipe`` from scratch, write ``output`` (safetensors, atomically) and return held-out metrics."""
    steps = recipe.steps if steps is None else steps
    seed = recipe.seed if seed is None else seed
    torch.manual_seed(seed)
    rng = recipe.scenes(seed, "train")
    generator = recipe.noise(seed, "train")
    model = recipe.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    progress = tqdm(range(steps), desc=type(model).__name__, unit="step")
    for _ in progress:
        batch = sample_batch(batch_size, rng, EMPTY_FRACTION)
        loss, accuracy = loss_and_accuracy(model, batch, degrade(batch.images, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
    model.eval()
    held_out = sample_batch(1000, recipe.scenes(seed, "held-out"), EMPTY_FRACTION)
    with torch.no_grad():
        _, clean = loss_and_accuracy(model, held_out, held_out.images)
        _, degraded = loss_and_accuracy(model, held_out, degrade(held_out.images, recipe.noise(seed, "held-out")))
        size_error = (model(held_out.images).size - held_out.size)[held_out.count > 0].abs().mean().item()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(output, lambda tmp: save_file(state, str(tmp)))
    return {
        "held_out_accuracy": clean,
        "held_out_accuracy_degraded": degraded,
        "size_mean_abs_error": size_error,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": time.perf_counter() - start,
    }
