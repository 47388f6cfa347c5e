"""GPU memory of DRaFT-1 at each family's native resolution, batch 1, from ``finetune.profiling.memory_model``.

Every model is built on the meta device at its real geometry (no weights, no compute, seconds per family): frozen
weights in bf16 and the LoRA (rank 8, the family's default targets) with its fp32 gradient and Adam moments are
counted exactly; activations are the bytes autograd saves in one bf16 forward of the guided denoiser call and of
the decode + aesthetic reward (CLIP ViT-L/14), with attention saved as a fused GPU kernel saves it. Not counted: a
backward's transient buffers, the CUDA context (about 0.5 GiB) and allocator slack, so read the total as a lower
bound to which a few GiB are added.

    python benchmarks/memory_model.py
"""

from __future__ import annotations

import provenance
import torch

from finetune.pipelines import build_random_pipeline
from finetune.profiling import memory_model
from rewards import get_reward

MODELS = (
    ("SD 1.5", "sd", "sd15"),
    ("SDXL base", "sdxl", "base"),
    ("SD3.5-medium", "sd3", "3.5-medium"),
    ("SD3.5-large", "sd3", "3.5-large"),
    ("FLUX.1-dev", "flux", "dev"),
    ("FLUX.1-schnell", "flux", "schnell"),
)
COLUMNS = (
    "model",
    "resolution",
    "frozen weights",
    "of which text encoders",
    "LoRA params",
    "LoRA + grad + Adam",
    "denoiser activations",
    "decode + reward activations",
    "total",
    "total, text encoders offloaded",
)


def main() -> None:
    print(provenance.header())
    print("DRaFT-1, batch 1, gradient checkpointing per step, bf16 frozen weights, LoRA rank 8; GiB")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    gib = 2**30
    for title, family, size in MODELS:
        with torch.device("meta"):
            pipeline = build_random_pipeline(size, family=family)
            reward = get_reward("aesthetic", pretrained=False)
        estimate = memory_model(pipeline, reward)
        resolution = pipeline.vae.config.sample_size
        cells = (
            title,
            f"{resolution}x{resolution}",
            f"{estimate.frozen_weights / gib:.1f}",
            f"{estimate.text_encoders / gib:.1f}",
            f"{estimate.lora_parameters / 1e6:.1f} M",
            f"{estimate.lora_state / gib:.2f}",
            f"{estimate.denoiser_activations / gib:.1f}",
            f"{estimate.decode_reward_activations / gib:.1f}",
            f"{estimate.total / gib:.1f}",
            f"{(estimate.total - estimate.text_encoders) / gib:.1f}",
        )
        print("| " + " | ".join(cells) + " |", flush=True)
    print(provenance.footer())


if __name__ == "__main__":
    main()
