"""Sample efficiency in the embedded shapes world: held-out reward against the number of images sampled, for
DRaFT-LV, DRaFT-K (K=1) and ReFL, several seeds each, all in one run on the same pipeline and reward.

    python benchmarks/sample_efficiency.py [--steps 60] [--seeds 3] [--output DIR]

Writes ``sample_efficiency.png``, ``sample_efficiency.json`` (every point) and ``sample_efficiency.md`` (the
figures and the ordering, whatever it is) to ``--output`` (default ``benchmarks/results``) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import provenance
import torch

from finetune.demo import OBJECTIVES, DemoConfig
from finetune.trainer import Trainer
from finetune.world import split_prompts
from finetune.world.pipeline import load_world_pipeline
from rewards import get_reward

METHODS = {"draft-lv": dict(lv_n=2), "draft-k": dict(k=1), "refl": {}}
OBJECTIVE = OBJECTIVES[0]
"""The demo's learned-classifier objective: bigger shapes (``shapes``, ``objective="size"``)."""


def run(method: str, seed: int, steps: int, reward, work: Path) -> list[tuple[int, float]]:
    """(images sampled, held-out reward) at every evaluation of one training run."""
    train_prompts, held_out = split_prompts()
    # The demo's settings (lr, batch, sampling, LoRA), so the regime matches what the demo shows.
    demo = DemoConfig(steps=steps, seed=seed, output_dir=str(work))
    run_objective = dataclasses.replace(OBJECTIVE, name=f"{method}-{seed}")
    settings = dict(method=method, eval_seeds=(1000, 1001), **METHODS[method])
    config = dataclasses.replace(demo.train_config(run_objective), **settings)
    Trainer(load_world_pipeline(), reward, config, train_prompts, held_out).train()
    rows = map(json.loads, (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines())
    return [(row.get("images_seen", 0), row["eval_reward"]) for row in rows if "eval_reward" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    reward = get_reward(OBJECTIVE.reward, **OBJECTIVE.options)
    results: dict[str, list[list[tuple[int, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            results[method] = [run(method, seed, args.steps, reward, Path(tmp)) for seed in range(args.seeds)]
    args.output.mkdir(parents=True, exist_ok=True)
    plot(results, args.output / "sample_efficiency.png")
    (args.output / "sample_efficiency.json").write_text(json.dumps(results, indent=1) + "\n")
    text = summarise(results, args)
    (args.output / "sample_efficiency.md").write_text(text)
    print(text)


def gains(runs: list[list[tuple[int, float]]], at: int = -1) -> list[float]:
    """Held-out reward at evaluation ``at`` (default: the last) minus the initial one, for each run."""
    return [points[at][1] - points[0][1] for points in runs]


def plot(results: dict[str, list[list[tuple[int, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, runs in results.items():
        xs = [x for x, _ in runs[0]]
        ys = [statistics.mean(run[i][1] for run in runs) for i in range(len(xs))]
        spread = [statistics.pstdev(run[i][1] for run in runs) for i in range(len(xs))]
        axis.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=method)
    axis.set(xlabel="images sampled (full sampling chains)", ylabel="held-out reward", title="sample efficiency")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summarise(results: dict[str, list[list[tuple[int, float]]]], args: argparse.Namespace) -> str:
    reference = statistics.mean(gains(results["draft-k"]))
    lines = [
        "# Sample efficiency in the embedded shapes world",
        "",
        provenance.header(),
        "",
        f"Command: `python benchmarks/sample_efficiency.py --steps {args.steps} --seeds {args.seeds}`; reward "
        "`shapes` (objective size) with the demo's settings (lr, batch, 10 DDIM steps, guidance 3, LoRA rank 4). "
        f"Held-out reward = mean over the demo's 12 held-out prompts x 2 seeds; gain = final minus initial. DRaFT-LV "
        f"(n=2) queries the reward twice per image sampled. Machine: CPU ({torch.get_num_threads()} threads).",
        "",
        "| method | images sampled | gain per seed | mean gain | ratio to draft-k | mean gain at half the images |",
        "|---|---|---|---|---|---|",
    ]
    order = sorted(results, key=lambda m: -statistics.mean(gains(results[m])))
    for method in order:
        g = gains(results[method])
        ratio = statistics.mean(g) / reference if reference else float("nan")
        images = results[method][0][-1][0]
        half = statistics.mean(gains(results[method], len(results[method][0]) // 2))
        per_seed = ", ".join(f"{x:+.3f}" for x in g)
        lines.append(f"| {method} | {images} | {per_seed} | {statistics.mean(g):+.3f} | {ratio:.2f} | {half:+.3f} |")
    means = [statistics.mean(gains(results[m])) for m in order]
    spread = max(max(gains(results[m])) - min(gains(results[m])) for m in order)
    verdict = "smaller" if means[0] - means[-1] < spread else "larger"
    lines += [
        "",
        f"Ordering by mean gain at equal images sampled: {' > '.join(order)}. The gap between the best and the worst "
        f"mean ({means[0] - means[-1]:.3f}) is {verdict} than the largest spread across seeds of one method "
        f"({spread:.3f}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
