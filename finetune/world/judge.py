"""How the world's three readers agree on a world pipeline's samples: the ``shapes`` classifier (what world rewards
train on), the independent judge ``shapes-judge`` and the learning-free measurement ``shapes-geometry``.

``python -m finetune.world.judge [--pipeline DIR] [--lora DIR] [--seeds N]`` samples every world caption at fixed
seeds (as ``python -m finetune.world.evaluate``) and prints, as JSON: each reader's prompt agreement (count,
colour and kind all the caption's) and per-attribute accuracy; how often two readers read an image alike; how
their sizes compare (correlation, mean absolute difference); and each reward's typical range and normalisation on
these samples (the numbers in the model cards).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch

from rewards.shapes.classifier import caption_targets

READERS = {"shapes": "shapes", "judge": "shapes-judge", "geometry": "shapes-geometry"}
"""Short names of the readers compared, and their rewards."""
TYPICAL_REWARDS = {
    "shapes-judge": [
        {"objective": "prompt"},
        {"objective": "count"},
        {"objective": "color", "target": "red"},
        {"objective": "shape", "target": "circle"},
        {"objective": "size"},
    ],
    "shapes-judge-match": [{}],
    "shapes-geometry": [{"objective": o} for o in ("size", "area", "count", "background", "match")],
}
"""The rewards (and options) whose typical range is measured: a colour or kind with one target, as for ``shapes``."""


def readings(images: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per reader: ``count``, ``color`` and ``shape`` labels and ``size`` of every image."""
    from rewards import get_reward
    from rewards.shapes.geometry import measure

    result = {}
    for short, name in READERS.items():
        if short == "geometry":
            reading = measure(images)
        else:
            with torch.no_grad():
                reading = get_reward(name, objective="size").classifier(images)
        labels = dict(zip(("count", "color", "shape"), reading.labels(), strict=True))
        result[short] = {**labels, "size": reading.size.float()}
    return result


def agreement(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, dict[str, float]]:
    """Prompt agreement per reader, pairwise agreement of readings and sizes (see the module docstring)."""
    read = readings(images)
    targets = dict(zip(("count", "color", "shape"), caption_targets(list(prompts), images.device), strict=True))
    result: dict[str, dict[str, float]] = {}
    for short, labels in read.items():
        same = {name: labels[name] == targets[name] for name in targets}
        result[f"{short} vs prompt"] = {
            "agreement": torch.stack(list(same.values())).all(0).float().mean().item(),
            **{f"{name}_accuracy": hit.float().mean().item() for name, hit in same.items()},
        }
    names = list(read)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            same = {name: read[a][name] == read[b][name] for name in targets}
            sizes = torch.stack([read[a]["size"], read[b]["size"]])
            counted = same["count"]  # touching shapes that one reader counts as one have another size per shape
            result[f"{a} vs {b}"] = {
                "same_reading": torch.stack(list(same.values())).all(0).float().mean().item(),
                **{f"same_{name}": hit.float().mean().item() for name, hit in same.items()},
                "size_correlation": torch.corrcoef(sizes)[0, 1].item(),
                "size_mean_abs_difference": (sizes[0] - sizes[1]).abs().mean().item(),
                "size_correlation_same_count": torch.corrcoef(sizes[:, counted])[0, 1].item(),
                "size_mean_abs_difference_same_count": (sizes[0] - sizes[1])[counted].abs().mean().item(),
            }
    return result


def typical_ranges(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, dict[str, float]]:
    """5th and 95th percentiles, mean and std of each of :data:`TYPICAL_REWARDS` on ``images``."""
    from rewards import get_reward

    result = {}
    for name, variants in TYPICAL_REWARDS.items():
        for options in variants:
            reward = get_reward(name, **options)
            with torch.no_grad():
                scores = reward(images, list(prompts) if reward.needs_prompts else None)
            low, high = torch.quantile(scores, torch.tensor([0.05, 0.95])).tolist()
            label = ",".join([name, *(f"{k}={v}" for k, v in options.items())])
            result[label] = {"p5": low, "p95": high, "mean": scores.mean().item(), "std": scores.std().item()}
    return result


def main(argv: list[str] | None = None) -> int:
    from finetune.sampling import generate
    from finetune.world import SHIPPED_PIPELINE
    from finetune.world.evaluate import DEFAULT_SEEDS, GUIDANCE_SCALE, NUM_INFERENCE_STEPS, world_sampler
    from finetune.world.pipeline import load_world_pipeline
    from rewards.shapes import all_captions

    parser = argparse.ArgumentParser(prog="python -m finetune.world.judge", description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(SHIPPED_PIPELINE), help="world pipeline directory")
    parser.add_argument("--lora", help="a LoRA (diffusers directory or file) to load first")
    parser.add_argument("--seeds", type=int, default=len(DEFAULT_SEEDS), help="seeds per prompt, from 1000")
    args = parser.parse_args(argv)
    pipeline = load_world_pipeline(args.pipeline)
    if args.lora:
        pipeline.load_lora_weights(args.lora)
    prompts = all_captions()
    seeds = range(DEFAULT_SEEDS[0], DEFAULT_SEEDS[0] + args.seeds)
    images = generate(world_sampler(pipeline, NUM_INFERENCE_STEPS, GUIDANCE_SCALE), prompts, seeds, batch_size=64)
    per_image = [p for p in prompts for _ in seeds]
    result = {
        "images": len(images),
        "agreement": agreement(images, per_image),
        "typical": typical_ranges(images, per_image),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
