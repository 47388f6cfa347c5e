"""The embedded default world: a small text-to-image pipeline and a classifier reward trained on procedural shapes.

``python -m finetune.world.train`` rebuilds the shipped weights; :func:`load_world_pipeline` loads them;
``python -m finetune train --model world`` fine-tunes the shipped pipeline with :data:`WORLD_TRAINING`.
"""

from __future__ import annotations

from pathlib import Path

from rewards.shapes.world import COLORS, MAX_COUNT, RESOLUTION, SHAPES, caption

SHIPPED_PIPELINE = Path(__file__).parent / "shapes-pipeline"
"""The shipped diffusers directory (``python -m finetune.world.train pipeline`` rebuilds it)."""

WORLD_TRAINING = dict(
    resolution=RESOLUTION,
    num_inference_steps=10,
    guidance_scale=3.0,
    lora_rank=4,
    lr=2e-4,
    weight_decay=0.0,
    batch_size=8,
    reward="brightness",
    prompts="world",
    eval_prompts="world-held-out",
    eval_seeds=(1000, 1001, 1002, 1003),
    device="cpu",
)
"""Training settings that suit the shipped world pipeline (the demo's): its 32 px images, 10 DDIM steps,
guidance 3, a learning rate that raises a reward without breaking prompt agreement, and its own captions."""

WORLD_DDPO_TRAINING = dict(lr=3e-3, batch_size=16, ddpo_clip_range=1e-3, ddpo_inner_epochs=2, ddpo_min_count=4)
"""What ``--method ddpo`` changes in :data:`WORLD_TRAINING`: rounds of 16, a learning rate that keeps most PPO
ratios within a clip range of 1e-3 over two inner epochs, and per-prompt statistics from 4 rewards (the JPEG size's
variance lies 91% between the world's prompts). With them 60 rounds raise ``jpeg-compressibility`` on held-out
prompts and seeds for each of 3 seeds (``benchmarks/results/ddpo_jpeg_cpu.md``), where lr 1e-2 with DDPO's clip
range 1e-4 and the round's statistics had not moved it (README, "RL methods")."""


def split_prompts() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): a third of the world's captions is held out of fine-tuning, chosen
    as a Latin square so that every count, colour and kind appears in both sets (12 held out, 24 for training)."""
    train, held_out = [], []
    for n in range(1, MAX_COUNT + 1):
        for c, color in enumerate(COLORS):
            for s, shape in enumerate(SHAPES):
                (held_out if (n + c + s) % 3 == 0 else train).append(caption(n, color, shape))
    return train, held_out
