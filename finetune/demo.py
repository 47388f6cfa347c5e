"""``python -m finetune demo``: the DRaFT story end to end in the embedded shapes world, on a CPU, no download.

1. measure the shipped world pipeline on held-out prompts and seeds (two rewards, prompt agreement);
2. train one LoRA per reward with DRaFT-K (bigger shapes from the learned classifier; a brighter background
   from the weight-free ``brightness`` reward), export each in diffusers and kohya formats;
3. mix the two LoRAs with ``compose`` at a grid of weights (0, negative and >1 included) and sample each mix;
4. over-optimisation: train ``bigger`` again at a learning rate that hacks the reward, once unguarded and once with
   early stopping on a judge (:data:`DEMO_JUDGES`), and measure the training reward, the judges and the diversity;
5. write grids, reward curves, ``metrics.jsonl``, ``report.md`` and a self-contained ``report.html``.
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
from finetune.guards import JUDGE_PREFIX
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
AGREEMENT_JUDGE, SIZE_JUDGE, AREA_JUDGE = "shapes-judge-match", "shapes-judge:size", "shapes-geometry:area"
"""Metric names of the demo's judges: prompt agreement and shape size by the independent classifier, and the
share of the image the shapes cover, measured with no learned parts."""
DEMO_JUDGES: dict[str, tuple[str, dict[str, str]]] = {
    AGREEMENT_JUDGE: ("shapes-judge-match", {}),
    SIZE_JUDGE: ("shapes-judge", {"objective": "size"}),
    AREA_JUDGE: ("shapes-geometry", {"objective": "area"}),
}
"""The judges of the demo (metric name: reward and options), independent of the ``shapes`` classifier that the
``bigger`` LoRA trains against: the world's second classifier (another architecture, seed and stream of scenes)
reads prompt agreement and shape size, and a measurement with no learned parts reads the share of the image the
shapes cover (``area``, not its ``size``: shapes grown until they touch are one blob to a segmentation). Scored
on every model's held-out images and at every training evaluation, never trained on. The over-optimisation
story's early stopping follows the agreement; diversity is measured in the first embedding among them
(:func:`finetune.diversity.feature_space`)."""
STORY = ("hacked", "guarded")
"""The over-optimisation story's runs: LoRA ``bigger`` at the story's learning rate, unguarded and with early
stopping."""


@dataclass
class DemoConfig:
    """Settings of ``python -m finetune demo`` (the defaults take about 7 minutes on 2 idle CPU cores; README)."""

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
    story_lr: float = 3e-3
    """The over-optimisation story's learning rate (15x ``lr``): enough to hack the ``bigger`` reward."""
    story_steps: int | None = None
    """Steps of the story's runs; ``None``: 2/5 of ``steps`` (at least 1), so a shortened demo stays short."""
    story_eval_every: int = 3
    story_early_stop: str = "patience=2,drop=0.02"
    """Early stopping of the story's guarded run (its judge is :data:`AGREEMENT_JUDGE`)."""
    overwrite: bool = False
    """Replace the artefacts of an earlier demo in ``output_dir`` (a non-empty directory is refused otherwise)."""

    @property
    def story_length(self) -> int:
        return self.story_steps if self.story_steps is not None else max(1, 2 * self.steps // 5)

    def early_stop(self) -> str:
        """The guarded run's ``--early-stop``."""
        return f"judge={AGREEMENT_JUDGE},{self.story_early_stop}"

    def story_config(self, run: str) -> TrainConfig:
        """A story run: LoRA ``bigger`` at ``story_lr`` for ``story_length`` steps (with early stopping if
        ``guarded``)."""
        steps = self.story_length
        return self.train_config(OBJECTIVES[0], run).replace(
            lr=self.story_lr,
            steps=steps,
            eval_every=min(self.story_eval_every, steps),
            checkpoint_every=steps,
            early_stop=self.early_stop() if run == "guarded" else None,
        )

    def train_config(self, objective: Objective, run: str | None = None) -> TrainConfig:
        """A LoRA's run, in ``output_dir/run`` (default: the objective's name)."""
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
            output_dir=str(Path(self.output_dir) / (run or objective.name)),
            device="cpu",
            extra={"demo": dataclasses.asdict(self)},
        )


ARTEFACTS = (
    *(o.name for o in OBJECTIVES),
    *STORY,
    *(f"grid_{label}.png" for label in ("base", *(o.name for o in OBJECTIVES), "mixed", *STORY)),
    "mixing_grid.png",
    "reward_curve.png",
    "overoptimisation.png",
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
        self.classifier = self.rewards[OBJECTIVES[0].name].classifier
        """The ``shapes`` classifier (the ``bigger`` reward's), which reads the prompt agreement."""
        self.judges = {name: get_reward(reward, **options) for name, (reward, options) in DEMO_JUDGES.items()}
        """Scored on every model's held-out images and at every training evaluation, never trained on."""
        self.space = feature_space(self.judges.values())
        self.stage = 0
        self.skipped: list[str] = []
        self.images: dict[str, torch.Tensor] = {}
        """Each measured model's held-out images, by grid label (for ``report.html``)."""

    def announce(self, text: str) -> None:
        """One line per stage, so a run shows where it is before its progress bars."""
        self.stage += 1
        print(f"[demo {self.stage}/{len(OBJECTIVES) + 4}] {text}", flush=True)

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
        unless ``label`` is None; return the mean of each demo reward, each judge (``judge/NAME``), the prompt
        agreement and the diversity, and the images."""
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
        for name, judge in self.judges.items():
            scores[JUDGE_PREFIX + name] = judge(images, image_prompts).float().mean().item()
        scores["agreement"] = following["agreement"]
        if len(config.eval_seeds) > 1:
            scores["diversity"] = diversity(images, len(config.eval_seeds), self.space).mean().item()
        return scores, images

    def train_lora(
        self, objective: Objective, config: TrainConfig | None = None, label: str | None = None
    ) -> tuple[list[dict], dict[str, float]]:
        """Train one LoRA (by default the objective's main run) and export it in diffusers and kohya formats;
        return its metrics (step 0 = evaluation only) and the fine-tuned model's scores (grid ``grid_{label}``)."""
        pipeline = load_world_pipeline(self.config.pipeline)
        config = config or self.config.train_config(objective)
        label = label or objective.name
        Trainer(
            pipeline, self.rewards[objective.name], config, self.train_prompts, self.held_out, judges=self.judges
        ).train()
        run_dir = Path(config.output_dir)
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        save_lora(load_lora(run_dir), run_dir / f"{label}_kohya.safetensors", format="kohya")
        return history, self.measure(pipeline, label)[0]

    def story(self) -> tuple[dict[str, list[dict]], dict[str, Any]]:
        """The over-optimisation story: LoRA ``bigger`` at ``story_lr``, unguarded (``hacked``) and with early
        stopping on the first judge (``guarded``, the same run until it stops, then its best LoRA); returns each
        run's metrics and the scores of both, with the steps early stopping stopped at and kept."""
        config = self.config
        curves: dict[str, list[dict]] = {}
        result: dict[str, Any] = {
            "lr": config.story_lr,
            "steps": config.story_length,
            "eval_every": min(config.story_eval_every, config.story_length),
            "early_stop": config.early_stop(),
        }
        for run in STORY:
            curves[run], result[run] = self.train_lora(OBJECTIVES[0], config.story_config(run), run)
        final = curves["guarded"][-1]
        if "best_step" in final:
            result["guarded"].update(
                kept_step=final["best_step"], stopped_at=final["step"], early_stopped=final["early_stopped"]
            )
        return curves, result

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
        self.announce(
            f"over-optimisation: LoRA '{OBJECTIVES[0].name}' at lr {config.story_lr:g} for {config.story_length} "
            f"steps, unguarded, then with early stopping ({config.early_stop()})"
        )
        story_curves, summary["story"] = self.story()
        self.announce(f"writing metrics, reward curves and report to {self.out}")
        runs = {**curves, **story_curves}
        lines = [json.dumps({"run": name, **row}) for name, history in runs.items() for row in history]
        atomic_write_text(self.out / "metrics.jsonl", "\n".join(lines) + "\n")
        self.cosmetic("reward_curve.png", lambda: plot_curves(curves, self.out / "reward_curve.png"))
        story_plot = self.out / "overoptimisation.png"
        self.cosmetic(story_plot.name, lambda: plot_story(story_curves, summary["story"], story_plot))
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


def plot_story(curves: dict[str, list[dict]], story: dict[str, Any], path: Path) -> None:
    """The story's runs against steps: training reward (batch and held out), each judge, diversity; the step early
    stopping kept is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = [JUDGE_PREFIX + name for name in DEMO_JUDGES]
    panels = {"training reward (bigger)": ["reward", "eval_reward"], **{k: [k] for k in judges}}
    panels["diversity"] = ["diversity"]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels.items(), strict=True):
        for run, style in zip(STORY, ("-", "--"), strict=True):
            for key in keys:
                rows = [r for r in curves[run] if key in r]
                label = f"{run}: {'training batch' if key == 'reward' else 'held out'}"
                axis.plot([r["step"] for r in rows], [r[key] for r in rows], style, marker=".", label=label)
        if "kept_step" in story["guarded"]:
            axis.axvline(story["guarded"]["kept_step"], color="grey", linestyle=":", label="kept by early stopping")
        axis.set(title=title, xlabel="step")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def story_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(label, scores) of the story's table: the base model, the hacked run's last LoRA, the guarded run's kept
    one."""
    story = summary["story"]
    guarded = story["guarded"]
    kept = f"step {guarded['kept_step']}" if "kept_step" in guarded else f"step {story['steps']}"
    return [
        ("base model", summary["base"]),
        (f"hacked (step {story['steps']})", story["hacked"]),
        (f"guarded (kept {kept})", guarded),
    ]


def story_text(summary: dict[str, Any], config: DemoConfig) -> list[str]:
    """What the story shows, in sentences computed from its numbers (a change is 'rose' or 'fell' as measured)."""
    story, base = summary["story"], summary["base"]
    reward = OBJECTIVES[0].name
    guarded = story["guarded"]
    if "kept_step" in guarded:
        how = "stopped early at" if guarded["early_stopped"] else "ran to"
        stop = f"it {how} step {guarded['stopped_at']} and kept the LoRA of step {guarded['kept_step']}"
    else:
        stop = "it kept its last LoRA"

    def change(scores: dict[str, float], key: str) -> str:
        if key not in scores or key not in base:
            return f"{key} not measured"
        delta = scores[key] - base[key]
        verdict = "rose" if delta > 0 else "fell" if delta < 0 else "unchanged"
        return f"{key} {base[key]:.3f} -> {scores[key]:.3f} ({verdict})"

    keys = [reward, *(JUDGE_PREFIX + name for name in DEMO_JUDGES), "diversity"]
    return [
        f"LoRA '{reward}' trained again at lr {story['lr']:g} ({story['lr'] / config.lr:g}x the runs above) for "
        f"{story['steps']} steps, evaluated on the held-out prompts every {story['eval_every']} steps. `hacked` has "
        f'no guard; `guarded` is the same run with `--early-stop "{story["early_stop"]}"`: '
        f"{stop} (the first judge's best). Measured on the held-out prompts and seeds, as above.",
        "",
        f"- hacked against the base model: {'; '.join(change(story['hacked'], k) for k in keys)}.",
        f"- guarded against the base model: {'; '.join(change(guarded, k) for k in keys)}.",
    ]


def independent_text(summary: dict[str, Any]) -> list[str]:
    """What the judges independent of the training classifier read of the first LoRA (``bigger``): its size gain,
    the gap to the training reward's gain, prompt agreement and the covered area."""
    name = OBJECTIVES[0].name
    base, after = summary["base"], summary[name]
    agreement, size, area = (JUDGE_PREFIX + judge for judge in (AGREEMENT_JUDGE, SIZE_JUDGE, AREA_JUDGE))
    gain, judged = after[name] - base[name], after[size] - base[size]
    return [
        f"- LoRA '{name}' read by the judges independent of its training classifier: shape size "
        f"{base[size]:.3f} -> {after[size]:.3f} ({judged:+.3f} by `{SIZE_JUDGE}`, against {gain:+.3f} by the "
        f"training reward: a gap of {gain - judged:+.3f}); prompt agreement {base[agreement]:.1%} -> "
        f"{after[agreement]:.1%} by `{AGREEMENT_JUDGE}`; share of the image covered by shapes (no learned "
        f"parts) {base[area]:.3f} -> {after[area]:.3f}."
    ]


def report(summary: dict[str, Any], config: DemoConfig) -> str:
    """The demo's numbers as Markdown."""
    names = [o.name for o in OBJECTIVES]
    a_name, b_name = names
    base, mixed = summary["base"], summary["mixing"]["mixed_1_1"]
    rows = [("base model", base), *((f"LoRA '{n}'", summary[n]) for n in names), ("mix 1 x A + 1 x B", mixed)]
    judge_columns = [f"judge `{name}`" for name in DEMO_JUDGES]

    def judge_cells(scores: dict[str, float]) -> str:
        return " | ".join(f"{scores[JUDGE_PREFIX + name]:.3f}" for name in DEMO_JUDGES)

    def spread(scores: dict[str, float]) -> str:
        return f"{scores['diversity']:.3f}" if "diversity" in scores else "-"

    lines = [
        "# DRaFT demo in the embedded shapes world",
        "",
        f"Method {config.method} (K={config.k}), {config.steps} steps of batch {config.batch_size}, "
        f"{config.num_inference_steps} DDIM steps, guidance {config.guidance_scale}, LoRA rank {config.lora_rank}. "
        f"Evaluated on {len(summary['held_out_prompts'])} held-out prompts x {len(config.eval_seeds)} seeds "
        f"(never used in fine-tuning). Total time {summary['seconds']:.0f} s.",
        "",
        "Rewards: " + "; ".join(f"`{o.name}` = {o.description}" for o in OBJECTIVES) + ". Judges (scored, never "
        f"trained on): {', '.join(f'`{name}`' for name in DEMO_JUDGES)}. Prompt agreement: share of images whose "
        "count, colour and kind the shapes classifier (the `bigger` reward's) reads as the prompt says. Diversity: "
        "per prompt, the mean cosine distance between different seeds' images in an image embedding "
        "(0: every seed draws the same picture).",
        "",
        f"| model | {' | '.join(names)} | {' | '.join(judge_columns)} | prompt agreement | diversity |",
        "|---|" + "---|" * (len(names) + len(judge_columns) + 2),
    ]
    for label, scores in rows:
        values = " | ".join(f"{scores[n]:.3f}" for n in names)
        lines.append(f"| {label} | {values} | {judge_cells(scores)} | {scores['agreement']:.1%} | {spread(scores)} |")
    lines += ["", "## Changes against the base model", ""]
    for name in names:
        after = summary[name]
        lines.append(
            f"- LoRA '{name}': {name} {base[name]:.3f} -> {after[name]:.3f} ({after[name] - base[name]:+.3f}); "
            f"prompt agreement {base['agreement']:.1%} -> {after['agreement']:.1%} "
            f"({100 * (after['agreement'] - base['agreement']):+.1f} points)."
        )
    lines += independent_text(summary)
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
    reward = OBJECTIVES[0].name
    lines += [
        "",
        "## Over-optimisation: reward hacking and early stopping",
        "",
        *story_text(summary, config),
        "",
        f"| model | training reward ({reward}) | {' | '.join(judge_columns)} | prompt agreement | diversity |",
        "|---|" + "---|" * (len(judge_columns) + 3),
    ]
    for label, scores in story_rows(summary):
        lines.append(
            f"| {label} | {scores[reward]:.3f} | {judge_cells(scores)} | {scores['agreement']:.1%} | {spread(scores)} |"
        )
    lines += [
        "",
        "`overoptimisation.png`: both runs' training reward, judges and diversity against steps.",
        "",
        "## Files",
        "",
        "- `grid_base.png`, `grid_bigger.png`, `grid_brighter.png`, `grid_mixed.png`, `grid_hacked.png`, "
        "`grid_guarded.png`: held-out prompts (rows) x seeds (columns), before and after;",
        "- `mixing_grid.png`: the weight grid; `reward_curve.png`, `overoptimisation.png`, `metrics.jsonl`: training "
        "curves;",
        "- `bigger/`, `brighter/`, `hacked/`, `guarded/`: each run's LoRA (`pytorch_lora_weights.safetensors`, "
        "diffusers; `*_kohya.safetensors`, for AUTOMATIC1111/ComfyUI/Forge), samples, metrics, configuration and "
        "`report.html`.",
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
    judges = [JUDGE_PREFIX + name for name in DEMO_JUDGES]
    rows = [("base model", summary["base"]), *((f"LoRA '{n}'", summary[n]) for n in names)]
    rows.append(("mix 1 x A + 1 x B", summary["mixing"]["mixed_1_1"]))
    page.table(
        ["model", *names, *judges, "prompt agreement", "diversity"],
        [[label, *(s[k] for k in (*names, *judges)), f"{s['agreement']:.1%}", s.get("diversity")] for label, s in rows],
    )
    page.heading("Over-optimisation: reward hacking and early stopping")
    for line in story_text(summary, config):
        if line:
            page.paragraph(line)
    page.table(
        ["model", f"training reward ({names[0]})", *judges, "prompt agreement", "diversity"],
        [
            [label, s[names[0]], *(s[k] for k in judges), f"{s['agreement']:.1%}", s.get("diversity")]
            for label, s in story_rows(summary)
        ],
    )
    labels = [label for label in ("base", *names, "mixed", *STORY) if label in images]
    if labels:
        page.heading("Held-out prompts: each model, one column per seed")
        seeds = len(config.eval_seeds)
        strips = {label: seed_strips(images[label], seeds) for label in labels}
        width = 48 * seeds
        for i, prompt in enumerate(summary["held_out_prompts"]):
            page.image_row([(label, strips[label][i]) for label in labels], prompt, width)
    plots = (
        ("reward_curve.png", "training curves"),
        ("overoptimisation.png", "over-optimisation: hacked and guarded runs"),
        ("mixing_grid.png", "mixing grid"),
    )
    for name, caption in plots:
        if (out / name).exists():
            with Image.open(out / name) as image:
                page.heading(caption.capitalize())
                page.image(image.convert("RGB"), caption)
    page.heading("Configuration")
    page.table(["setting", "value"], list(summary["config"].items()))
    return page.write(out / "report.html")
