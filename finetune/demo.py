"""``python -m finetune demo``: the DRaFT story end to end in the embedded shapes world, on a CPU, no download.

1. measure the shipped world pipeline on held-out prompts and seeds (two rewards, prompt agreement);
2. train one LoRA per reward with DRaFT-K (bigger shapes from the learned classifier; a brighter background
   from the weight-free ``brightness`` reward), export each in diffusers and kohya formats;
3. mix the two LoRAs with ``compose`` at a grid of weights (0, negative and >1 included) and sample each mix;
4. write grids, a reward curve, ``metrics.jsonl``, ``report.md`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from compose import load_lora, mix, save_lora
from compose.files import atomic_write
from compose.fuse import add_to_pipeline
from finetune.checkpoint import atomic_write_text
from finetune.config import TrainConfig
from finetune.diversity import diversity, feature_space
from finetune.outputs import claim_output_dir
from finetune.tracking import labelled_grid, save_grid
from finetune.trainer import Trainer
from finetune.world import SHIPPED_PIPELINE, WORLD_TRAINING, split_prompts
from finetune.world.evaluate import evaluate_pipeline
from finetune.world.pipeline import load_world_pipeline
from rewards import get_reward


@dataclass
class Objective:
    """One LoRA of the demo: a reward and the words the report uses for it."""

    name: str
    reward: str
    options: dict
    description: str


OBJECTIVES = (
    Objective("bigger", "shapes", {"objective": "size"}, "shape size read by the shapes classifier (0 to 1)"),
    Objective("brighter", "brightness", {}, "mean luma of the image (0 to 1)"),
)


@dataclass
class DemoConfig:
    """Settings of ``python -m finetune demo`` (the defaults take 3 to 6 minutes on 2 CPU cores; README)."""

    output_dir: str = "outputs/demo"
    pipeline: str = str(SHIPPED_PIPELINE)
    steps: int = 60
    batch_size: int = WORLD_TRAINING["batch_size"]
    method: str = "draft-k"
    k: int = 2
    num_inference_steps: int = WORLD_TRAINING["num_inference_steps"]
    guidance_scale: float = WORLD_TRAINING["guidance_scale"]
    lora_rank: int = WORLD_TRAINING["lora_rank"]
    lr: float = WORLD_TRAINING["lr"]
    seed: int = 0
    eval_seeds: tuple[int, ...] = tuple(range(1000, 1008))
    mix_weights: tuple[float, ...] = (-0.5, 0.0, 0.5, 1.0, 1.5)
    mix_prompt: str = "two blue triangles"
    overwrite: bool = False
    """Replace the artefacts of an earlier demo in ``output_dir`` (a non-empty directory is refused otherwise)."""

    def train_config(self, objective: Objective) -> TrainConfig:
        return TrainConfig(
            model=self.pipeline,
            reward=objective.reward,
            method=self.method,
            k=self.k,
            resolution=WORLD_TRAINING["resolution"],
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            lora_rank=self.lora_rank,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=0.0,
            seed=self.seed,
            eval_seeds=self.eval_seeds,
            eval_every=max(1, self.steps // 4),
            checkpoint_every=self.steps,
            keep_checkpoints=1,
            output_dir=str(Path(self.output_dir) / objective.name),
            device="cpu",
            extra={"demo": dataclasses.asdict(self)},
        )


ARTEFACTS = (
    *(o.name for o in OBJECTIVES),
    *(f"grid_{label}.png" for label in ("base", *(o.name for o in OBJECTIVES), "mixed")),
    "mixing_grid.png",
    "reward_curve.png",
    "metrics.jsonl",
    "summary.json",
    "report.md",
    "report.html",
)
"""Everything a demo run writes in its output directory (what ``--overwrite`` replaces)."""


class Demo:
    """One demo run: the rewards, the held-out split, and the measurements written to ``config.output_dir``."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.train_prompts, self.held_out = split_prompts()
        self.rewards = {o.name: get_reward(o.reward, **o.options) for o in OBJECTIVES}
        self.classifier = get_reward("shapes", objective="prompt").classifier
        self.judge = get_reward("shapes-match")
        """Prompt agreement at every training evaluation (a judge: scored, never trained on)."""
        self.space = feature_space([self.judge])
        self.stage = 0
        self.skipped: list[str] = []
        self.images: dict[str, torch.Tensor] = {}
        """Each measured model's held-out images, by grid label (for ``report.html``)."""

    def announce(self, text: str) -> None:
        """One line per stage, so a run shows where it is before its progress bars."""
        self.stage += 1
        print(f"[demo {self.stage}/{len(OBJECTIVES) + 3}] {text}", flush=True)

    def cosmetic(self, artefact: str, write: Callable[[], None]) -> None:
        """Write a plot or grid; if that fails, say what is missing and how to get it, and go on: the LoRAs,
        metrics and images already written are the run's results and stay."""
        try:
            write()
        except Exception as err:  # a picture must never throw away finished work
            hint = f"; install it with `python -m pip install {err.name}`" if isinstance(err, ImportError) else ""
            print(f"warning: {artefact} not written ({type(err).__name__}: {err}){hint}", file=sys.stderr)
            self.skipped.append(artefact)

    @torch.no_grad()
    def measure(
        self, pipeline: StableDiffusionPipeline, label: str | None, prompts: list[str] | None = None
    ) -> tuple[dict[str, float], torch.Tensor]:
        """Sample ``prompts`` (default: the held-out ones) at the evaluation seeds; save ``grid_{label}.png``
        unless ``label`` is None; return the mean of each demo reward and the prompt agreement, and the images."""
        config = self.config
        prompts = prompts or self.held_out
        following, images = evaluate_pipeline(
            pipeline, self.classifier, prompts, config.eval_seeds, config.num_inference_steps, config.guidance_scale
        )
        if label is not None:
            self.images[label] = images
            path = self.out / f"grid_{label}.png"
            seeds = len(config.eval_seeds)
            self.cosmetic(path.name, lambda: save_grid(images, path, seeds, prompts, cell=4 * images.shape[-1]))
        image_prompts = [p for p in prompts for _ in config.eval_seeds]
        scores = {name: reward(images, image_prompts).mean().item() for name, reward in self.rewards.items()}
        scores["agreement"] = following["agreement"]
        if len(config.eval_seeds) > 1:
            scores["diversity"] = diversity(images, len(config.eval_seeds), self.space).mean().item()
        return scores, images

    def train_lora(self, objective: Objective) -> tuple[list[dict], dict[str, float]]:
        """Train one LoRA and export it in diffusers and kohya formats; return its metrics (step 0 = evaluation
        only) and the fine-tuned model's scores."""
        pipeline = load_world_pipeline(self.config.pipeline)
        config = self.config.train_config(objective)
        judges = {"shapes-match": self.judge}
        Trainer(
            pipeline, self.rewards[objective.name], config, self.train_prompts, self.held_out, judges=judges
        ).train()
        run_dir = Path(config.output_dir)
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        save_lora(load_lora(run_dir), run_dir / f"{objective.name}_kohya.safetensors", format="kohya")
        return history, self.measure(pipeline, objective.name)[0]

    def mixing_grid(self) -> dict[str, Any]:
        """Sample ``a * LoRA_A + b * LoRA_B`` (compose's exact mix, merged into the weights) for every pair of
        weights on ``mix_prompt``: a labelled grid (first seed) and each cell's scores (all evaluation seeds).
        The (1, 1) mix is also measured on every held-out prompt."""
        config = self.config
        names = [o.name for o in OBJECTIVES]
        loras = [load_lora(self.out / name) for name in names]
        pipeline = load_world_pipeline(config.pipeline)
        original = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
        cells, first_images = [], []
        for a in tqdm(config.mix_weights, desc="mixing grid", unit="row"):
            for b in config.mix_weights:
                add_to_pipeline(mix(loras, [a, b]), pipeline)
                scores, images = self.measure(pipeline, None, [config.mix_prompt])
                first_images.append(images[0])
                cells.append({f"weight_{names[0]}": a, f"weight_{names[1]}": b, **scores})
                pipeline.unet.load_state_dict(original)
        labels = [[f"{name} {w:+g}" for w in config.mix_weights] for name in names]

        def write_grid() -> None:
            grid = labelled_grid(torch.stack(first_images), len(config.mix_weights), *labels, cell=96)
            atomic_write(self.out / "mixing_grid.png", lambda tmp: grid.save(tmp, format="PNG"))

        self.cosmetic("mixing_grid.png", write_grid)
        add_to_pipeline(mix(loras, [1.0, 1.0]), pipeline)
        return {"cells": cells, "mixed_1_1": self.measure(pipeline, "mixed")[0]}

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        config = self.config
        claim_output_dir(self.out, ARTEFACTS, resume=False, overwrite=config.overwrite, what="demo")
        self.out.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {"config": dataclasses.asdict(config), "held_out_prompts": self.held_out}
        evaluation = f"{len(self.held_out)} held-out prompts x {len(config.eval_seeds)} seeds"
        self.announce(f"measuring the shipped world pipeline on {evaluation}")
        summary["base"] = self.measure(load_world_pipeline(config.pipeline), "base")[0]
        curves = {}
        for objective in OBJECTIVES:
            self.announce(
                f"training LoRA '{objective.name}' ({objective.description}): {config.method}, {config.steps} steps"
            )
            curves[objective.name], summary[objective.name] = self.train_lora(objective)
        weights = ", ".join(f"{w:g}" for w in config.mix_weights)
        self.announce(f"mixing the two LoRAs with compose at weights {{{weights}}} x {{{weights}}}")
        summary["mixing"] = self.mixing_grid()
        self.announce(f"writing metrics, reward curve and report to {self.out}")
        lines = [json.dumps({"run": name, **row}) for name, history in curves.items() for row in history]
        atomic_write_text(self.out / "metrics.jsonl", "\n".join(lines) + "\n")
        self.cosmetic("reward_curve.png", lambda: plot_curves(curves, self.out / "reward_curve.png"))
        summary["skipped"] = self.skipped
        summary["seconds"] = time.perf_counter() - start
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(self.out / "report.md", report(summary, config))
        self.cosmetic("report.html", lambda: write_html_report(summary, config, self.images, self.out))
        return summary


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the summary also written to ``summary.json`` and ``report.md``."""
    return Demo(config).run()


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    """Training reward per step and held-out reward at each evaluation, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for axis, (name, history) in zip(axes[0], curves.items(), strict=True):
        steps = [r for r in history if "reward" in r]
        axis.plot([r["step"] for r in steps], [r["reward"] for r in steps], label="training batch", alpha=0.6)
        evals = [r for r in history if "eval_reward" in r]
        axis.plot([r["step"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="held-out prompts")
        axis.set(title=f"LoRA '{name}'", xlabel="step", ylabel="reward")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report(summary: dict[str, Any], config: DemoConfig) -> str:
    """The demo's numbers as Markdown."""
    names = [o.name for o in OBJECTIVES]
    a_name, b_name = names
    base, mixed = summary["base"], summary["mixing"]["mixed_1_1"]
    rows = [("base model", base), *((f"LoRA '{n}'", summary[n]) for n in names), ("mix 1 x A + 1 x B", mixed)]
    lines = [
        "# DRaFT demo in the embedded shapes world",
        "",
        f"Method {config.method} (K={config.k}), {config.steps} steps of batch {config.batch_size}, "
        f"{config.num_inference_steps} DDIM steps, guidance {config.guidance_scale}, LoRA rank {config.lora_rank}. "
        f"Evaluated on {len(summary['held_out_prompts'])} held-out prompts x {len(config.eval_seeds)} seeds "
        f"(never used in fine-tuning). Total time {summary['seconds']:.0f} s.",
        "",
        "Rewards: " + "; ".join(f"`{o.name}` = {o.description}" for o in OBJECTIVES) + ". Prompt agreement: share "
        "of images whose count, colour and kind the shapes classifier reads as the prompt says. Diversity: per "
        "prompt, the mean cosine distance between the classifier's features of different seeds' images (0: every "
        "seed draws the same picture).",
        "",
        f"| model | {' | '.join(names)} | prompt agreement | diversity |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for label, scores in rows:
        values = " | ".join(f"{scores[n]:.3f}" for n in names)
        spread = f"{scores['diversity']:.3f}" if "diversity" in scores else "-"
        lines.append(f"| {label} | {values} | {scores['agreement']:.1%} | {spread} |")
    lines += ["", "## Changes against the base model", ""]
    for name in names:
        after = summary[name]
        lines.append(
            f"- LoRA '{name}': {name} {base[name]:.3f} -> {after[name]:.3f} ({after[name] - base[name]:+.3f}); "
            f"prompt agreement {base['agreement']:.1%} -> {after['agreement']:.1%} "
            f"({100 * (after['agreement'] - base['agreement']):+.1f} points)."
        )
    both = all(mixed[n] > base[n] for n in names)
    changes = ", ".join(f"{n} {mixed[n] - base[n]:+.3f}" for n in names)
    verdict = "higher on both rewards" if both else "NOT higher on both rewards"
    lines.append(f"- Mixed LoRA (1 x {a_name} + 1 x {b_name}): {changes} against the base model: {verdict}.")
    weights = config.mix_weights
    lines += [
        "",
        "## Mixing grid",
        "",
        f"Prompt '{config.mix_prompt}', mean over {len(config.eval_seeds)} seeds. Row: weight of LoRA '{a_name}'; "
        f"column: weight of LoRA '{b_name}'; each cell: {a_name} / {b_name} scores. `mixing_grid.png` shows the "
        "first seed. The (0, 0) cell is the base model; along a row or column one LoRA is scaled toward it.",
        "",
        f"| {a_name} \\ {b_name} | " + " | ".join(f"{w:+g}" for w in weights) + " |",
        "|---|" + "---|" * len(weights),
    ]
    for a in weights:
        row = [c for c in summary["mixing"]["cells"] if c[f"weight_{a_name}"] == a]
        lines.append(f"| {a:+g} | " + " | ".join(f"{c[a_name]:.2f} / {c[b_name]:.2f}" for c in row) + " |")
    lines += [
        "",
        "## Files",
        "",
        "- `grid_base.png`, `grid_bigger.png`, `grid_brighter.png`, `grid_mixed.png`: held-out prompts (rows) x "
        "seeds (columns), before and after;",
        "- `mixing_grid.png`: the weight grid; `reward_curve.png`, `metrics.jsonl`: training curves;",
        "- `bigger/`, `brighter/`: each run's LoRA (`pytorch_lora_weights.safetensors`, diffusers; "
        "`*_kohya.safetensors`, for AUTOMATIC1111/ComfyUI/Forge), samples, metrics and configuration.",
        "",
    ]
    if summary["skipped"]:
        lines += [f"Not written (see the run's warnings): {', '.join(summary['skipped'])}.", ""]
    return "\n".join(lines)


def write_html_report(summary: dict[str, Any], config: DemoConfig, images: dict[str, torch.Tensor], out: Path) -> Path:
    """Write ``out/report.html``: the numbers of ``report.md``, every held-out prompt's images from each model with the
    prompt under its row, the curves and the mixing grid (embedded), the configuration and the time taken."""
    from PIL import Image

    from finetune.report_html import HtmlReport, seed_strips

    names = [o.name for o in OBJECTIVES]
    page = HtmlReport("DRaFT demo in the embedded shapes world")
    page.paragraph(
        f"Method {config.method} (K={config.k}), {config.steps} steps of batch {config.batch_size}; evaluated on "
        f"{len(summary['held_out_prompts'])} held-out prompts x {len(config.eval_seeds)} seeds. Total time "
        f"{summary['seconds']:.0f} s."
    )
    rows = [("base model", summary["base"]), *((f"LoRA '{n}'", summary[n]) for n in names)]
    rows.append(("mix 1 x A + 1 x B", summary["mixing"]["mixed_1_1"]))
    page.table(
        ["model", *names, "prompt agreement", "diversity"],
        [[label, *(s[n] for n in names), f"{s['agreement']:.1%}", s.get("diversity")] for label, s in rows],
    )
    labels = [label for label in ("base", *names, "mixed") if label in images]
    if labels:
        page.heading("Held-out prompts: each model, one column per seed")
        seeds = len(config.eval_seeds)
        strips = {label: seed_strips(images[label], seeds) for label in labels}
        width = 48 * seeds
        for i, prompt in enumerate(summary["held_out_prompts"]):
            page.image_row([(label, strips[label][i]) for label in labels], prompt, width)
    for name, caption in (("reward_curve.png", "training curves"), ("mixing_grid.png", "mixing grid")):
        if (out / name).exists():
            with Image.open(out / name) as image:
                page.heading(caption.capitalize())
                page.image(image.convert("RGB"), caption)
    page.heading("Configuration")
    page.table(["setting", "value"], list(summary["config"].items()))
    return page.write(out / "report.html")
