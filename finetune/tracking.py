"""Run outputs: ``metrics.jsonl`` (one line per step), TensorBoard scalars, and PNG image grids labelled with
their prompts."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
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

    def truncate(self, step: int, run_end_key: str | None = None) -> None:
        """Drop lines after ``step`` (used on resume, so a replayed step is not logged twice), and the lines that
        hold ``run_end_key``: an earlier run's closing record, which the resumed run writes anew when it ends."""
        if not self.path.exists():
            return
        rows = [(line, json.loads(line)) for line in self.path.read_text().splitlines() if line]
        kept = [line for line, row in rows if row["step"] <= step and (run_end_key is None or run_end_key not in row)]
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


def save_grid(
    images: torch.Tensor,
    path: Path,
    columns: int,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    cell: int | None = None,
) -> None:
    """Write :func:`labelled_grid` as PNG (atomically)."""
    grid = labelled_grid(images, columns, row_labels, column_labels, cell)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def labelled_grid(
    images: torch.Tensor,
    columns: int,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    cell: int | None = None,
) -> Image.Image:
    """:func:`image_grid` with each image scaled to ``cell`` pixels wide (nearest neighbour; default: as it is),
    a text label (e.g. the row's prompt, wrapped) left of each row and one above each column."""
    from PIL import ImageDraw

    cell = cell or images.shape[-1]
    cell_height = cell * images.shape[-2] // images.shape[-1]
    grid = image_grid(images, columns)
    grid = grid.resize(
        (grid.width * cell // images.shape[-1], grid.height * cell_height // images.shape[-2]), Image.NEAREST
    )
    line_height, char_width = 12, 6  # PIL's default bitmap font
    chars = max(12, min(40, max((len(label) for label in row_labels), default=0)))
    wrapped = [textwrap.wrap(label, chars) or [""] for label in row_labels]
    margin_left = chars * char_width + 10 if row_labels else 0
    margin_top = line_height + 8 if column_labels else 0
    canvas = Image.new("RGB", (margin_left + grid.width, margin_top + grid.height), "white")
    canvas.paste(grid, (margin_left, margin_top))
    draw = ImageDraw.Draw(canvas)
    for r, lines in enumerate(wrapped):
        lines = lines[: max(1, cell_height // line_height)]
        top = margin_top + r * cell_height + (cell_height - line_height * len(lines)) // 2
        for i, line in enumerate(lines):
            draw.text((4, top + i * line_height), line, fill="black")
    for c, label in enumerate(column_labels):
        draw.text((margin_left + c * cell + 4, 4), label, fill="black")
    return canvas
