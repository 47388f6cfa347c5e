"""How well a world pipeline follows its prompts, as judged by the ``shapes`` classifier.

``python -m finetune.world.evaluate [--pipeline DIR] [--lora DIR] [--guidance-scale G]`` samples every world
caption (or ``--prompts``) at fixed seeds and prints the share of images whose count, colour and kind the
classifier reads as the caption says, overall and per attribute.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline

from finetune.pipelines import check_pipeline
from finetune.sampling import Sampler, generate
from rewards.shapes import ShapesClassifier, all_captions, prompt_agreement
from rewards.shapes.classifier import caption_targets

DEFAULT_SEEDS = tuple(range(1000, 1008))
"""Noise seeds for evaluation (training draws its noise from a generator seeded with 0, never these)."""
NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 3.0


def world_sampler(
    pipeline: StableDiffusionPipeline, num_inference_steps: int = NUM_INFERENCE_STEPS, guidance: float = GUIDANCE_SCALE
) -> Sampler:
    """A no-checkpointing DDIM sampler over ``pipeline``'s own UNet and VAE at its native resolution."""
    family = check_pipeline(pipeline)
    return Sampler(
        family=family,
        resolution=pipeline.unet.config.sample_size * family.vae_scale_factor,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance,
        checkpoint_unet=False,
    )


@torch.no_grad()
def prompt_following(images: torch.Tensor, prompts: Sequence[str], classifier: ShapesClassifier) -> dict[str, float]:
    """Share of ``images`` (one per prompt) whose classified count, colour and kind all match, and each alone."""
    prediction = classifier(images)
    targets = caption_targets(list(prompts), images.device)
    result = {"agreement": prompt_agreement(prediction, list(prompts)).mean().item()}
    for name, label, target in zip(("count", "color", "shape"), prediction.labels(), targets, strict=True):
        result[f"{name}_accuracy"] = (label == target).float().mean().item()
    return result


def evaluate_pipeline(
    pipeline: StableDiffusionPipeline,
    classifier: ShapesClassifier,
    prompts: Sequence[str],
    seeds: Sequence[int] = DEFAULT_SEEDS,
    num_inference_steps: int = NUM_INFERENCE_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
) -> tuple[dict[str, float], torch.Tensor]:
    """Sample every prompt at every seed; return the prompt-following figures and the images (prompt-major)."""
    sampler = world_sampler(pipeline, num_inference_steps, guidance_scale)
    images = generate(sampler, prompts, seeds, batch_size=64)
    return prompt_following(images, [p for p in prompts for _ in seeds], classifier), images


def main(argv: list[str] | None = None) -> int:
    from finetune.world import SHIPPED_PIPELINE
    from finetune.world.pipeline import load_world_pipeline
    from rewards import get_reward

    parser = argparse.ArgumentParser(prog="python -m finetune.world.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(SHIPPED_PIPELINE), help="world pipeline directory")
    parser.add_argument("--lora", help="a LoRA (diffusers directory or file) to load first")
    parser.add_argument("--prompts", nargs="+", help="captions to test (default: all 36)")
    parser.add_argument("--seeds", type=int, default=len(DEFAULT_SEEDS), help="seeds per prompt, from 1000")
    parser.add_argument("--steps", type=int, default=NUM_INFERENCE_STEPS, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE)
    args = parser.parse_args(argv)
    pipeline = load_world_pipeline(args.pipeline)
    if args.lora:
        pipeline.load_lora_weights(args.lora)
    classifier = get_reward("shapes", objective="prompt").classifier
    prompts = args.prompts or all_captions()
    seeds = range(1000, 1000 + args.seeds)
    result, _ = evaluate_pipeline(pipeline, classifier, prompts, seeds, args.steps, args.guidance_scale)
    result.update(prompts=len(prompts), images=len(prompts) * args.seeds, guidance_scale=args.guidance_scale)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
