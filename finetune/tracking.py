"""Run outputs: ``metrics.jsonl`` (one line per step), TensorBoard scalars, and PNG image grids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from compose.files import atomic_write


class MetricsLog:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors numeric values to TensorBoard."""

    def __init__(self, output_dir: Path, tensorboard: bool = True) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def truncate(self, step: int) -> None:
        """Drop lines after ``step`` (used on resume, so a replayed step is not logged twice)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """Tile images [N, 3, H, W] in [0, 1] into a PIL image with ``columns`` columns."""
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = torch.ones(3, rows * h, columns * w)
    for i, image in enumerate(images.detach().float().cpu()):
        r, c = divmod(i, columns)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    array = (canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def save_grid(images: torch.Tensor, path: Path, columns: int, scale: int = 1) -> None:
    """Write an image grid as PNG (atomically), enlarged ``scale`` times (nearest neighbour) for small images."""
    grid = image_grid(images, columns)
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def labelled_grid(
    images: torch.Tensor, columns: int, row_labels: list[str], column_labels: list[str], cell: int = 96
) -> Image.Image:
    """:func:`image_grid` with each image enlarged to ``cell`` pixels (nearest neighbour), a text label left of each
    row and above each column."""
    from PIL import ImageDraw

    grid = image_grid(images, columns)
    grid = grid.resize((grid.width * cell // images.shape[-1], grid.height * cell // images.shape[-2]), Image.NEAREST)
    margin_left, margin_top = 110, 24
    canvas = Image.new("RGB", (margin_left + grid.width, margin_top + grid.height), "white")
    canvas.paste(grid, (margin_left, margin_top))
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(row_labels):
        draw.text((4, margin_top + r * cell + cell // 2 - 6), label, fill="black")
    for c, label in enumerate(column_labels):
        draw.text((margin_left + c * cell + 4, 6), label, fill="black")
    return canvas
