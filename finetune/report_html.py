"""Self-contained HTML run reports (``report.html``): images embedded as base64 PNG, no script, no network.

:class:`HtmlReport` builds a page from headings, paragraphs, tables, images and rows of images with a caption
under each row; :func:`training_report` is the page every training run writes (before/after grids of the held-out
prompts, training reward and judges against steps, diversity, the configuration, timings).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from compose.files import atomic_write
from finetune.tracking import image_grid

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 0.9em; }
figure { display: inline-block; margin: 0 1em 1.2em 0; vertical-align: top; }
figcaption { font-size: 0.9em; margin-top: 0.3em; }
.row { margin-bottom: 1.2em; }
.row figure { margin-bottom: 0.2em; }
.prompt { font-style: italic; }
img { image-rendering: pixelated; border: 1px solid #ddd; max-width: 100%; height: auto; }
.warning { color: #a00; }
"""


def png_data_uri(image: Image.Image) -> str:
    """A ``data:image/png;base64,...`` URI of ``image``."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class HtmlReport:
    """A page built part by part; :meth:`write` saves it atomically."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, css_class: str | None = None) -> None:
        attribute = f' class="{css_class}"' if css_class else ""
        self.parts.append(f"<p{attribute}>{html.escape(text)}</p>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, image: Image.Image, caption: str, width: int | None = None) -> None:
        self.parts.append(_figure(image, caption, width))

    def image_row(self, images: Sequence[tuple[str, Image.Image]], caption: str, width: int | None = None) -> None:
        """Labelled images side by side with ``caption`` (e.g. the prompt) under the row."""
        figures = "".join(_figure(image, label, width) for label, image in images)
        self.parts.append(f'<div class="row">{figures}<div class="prompt">{html.escape(caption)}</div></div>')

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        text = self.render()
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


def _figure(image: Image.Image, caption: str, width: int | None) -> str:
    width = width or image.width
    height = round(image.height * width / image.width)
    return (
        f'<figure><img src="{png_data_uri(image)}" width="{width}" height="{height}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def seed_strips(images: torch.Tensor, seeds: int) -> list[Image.Image]:
    """One image per prompt: its ``seeds`` images side by side (``images`` prompt-major)."""
    return [image_grid(images[i : i + seeds], seeds) for i in range(0, len(images), seeds)]


def plot_metrics(history: Sequence[Mapping[str, Any]], panels: Mapping[str, Sequence[str]]) -> Image.Image:
    """One panel per entry of ``panels`` (title -> metric keys), each key's values against ``step``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels.items(), strict=True):
        for key in keys:
            rows = [r for r in history if isinstance(r.get(key), (int, float))]
            style = "-" if len(rows) > 20 else "o-"
            axis.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=key, markersize=3)
        axis.set(title=title, xlabel="step")
        axis.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def metric_panels(history: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The panels of a training run's plot: rewards, each judge, diversity, the anchor penalty (those logged)."""
    keys = {k for row in history for k in row}
    panels = {"training reward": [k for k in ("reward", "eval_reward") if k in keys]}
    for key in sorted(k for k in keys if k.startswith("judge/")):
        panels[key] = [key]
    for key in ("diversity", "anchor"):
        if key in keys:
            panels[key] = [key]
    return {title: series for title, series in panels.items() if series}


def training_report(
    title: str,
    history: Sequence[Mapping[str, Any]],
    prompts: Sequence[str],
    seeds: int,
    before: tuple[int, torch.Tensor] | None,
    after: tuple[int, torch.Tensor] | None,
    config: Mapping[str, Any],
    notes: Sequence[str] = (),
    timings: Mapping[str, float] | None = None,
) -> HtmlReport:
    """The page of one training run: ``history`` holds the metrics lines (evaluations included), ``before`` and
    ``after`` the (step, prompt-major images) of the first and last evaluations."""
    report = HtmlReport(title)
    for note in notes:
        report.paragraph(note, "warning" if note.startswith("warning") else None)
    evaluations = [r for r in history if "eval_reward" in r]
    if evaluations:
        report.heading("Held-out evaluation")
        keys = ["eval_reward", *sorted({k for r in evaluations for k in r if k.startswith("judge/")})]
        keys += [k for k in ("diversity",) if any(k in r for r in evaluations)]
        report.table(["step", *keys], [[r["step"], *(r.get(k) for k in keys)] for r in evaluations])
    if before is not None and after is not None:
        report.heading(f"Held-out prompts: step {before[0]} (left) and step {after[0]} (right), one column per seed")
        width = max(96, before[1].shape[-1]) * seeds
        strips = zip(prompts, seed_strips(before[1], seeds), seed_strips(after[1], seeds), strict=True)
        for prompt, first, last in strips:
            report.image_row([(f"step {before[0]}", first), (f"step {after[0]}", last)], prompt, width)
    panels = metric_panels(history)
    if panels and history:
        report.heading("Curves")
        try:
            report.image(plot_metrics(history, panels), "metrics against optimizer steps")
        except ImportError as err:
            report.paragraph(f"warning: no plot ({err}); install matplotlib", "warning")
    if timings:
        report.heading("Timings")
        report.table(["what", "seconds"], list(timings.items()))
    report.heading("Configuration")
    report.table(["setting", "value"], list(config.items()))
    return report
