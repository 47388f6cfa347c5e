"""Fuse a LoRA into a full diffusers pipeline: every targeted weight becomes ``W + delta``, saved as a new
pipeline directory (written beside the target, then renamed into place)."""

from __future__ import annotations

from pathlib import Path

import torch

from compose.files import atomic_write_directory
from compose.lora import LoRA


def fuse_into_pipeline(lora: LoRA, base: str | Path, output: str | Path) -> Path:
    """Load the diffusers pipeline directory ``base``, add each module's delta to its weight, save to ``output``."""
    from diffusers import DiffusionPipeline

    output = Path(output)
    if output.exists():
        raise ValueError(f"{output} exists; choose a new directory for the fused pipeline")
    pipeline = DiffusionPipeline.from_pretrained(str(base))
    add_to_pipeline(lora, pipeline, where=f"the pipeline in {base}")
    atomic_write_directory(output, pipeline.save_pretrained)
    return output


def add_to_pipeline(lora: LoRA, pipeline: object, where: str = "the pipeline") -> None:
    """Add each module's delta to the matching weight of a loaded diffusers pipeline, in place (no adapter layers:
    the merged model runs at the base model's speed)."""
    with torch.no_grad():
        for name, module in lora.modules.items():
            component, path = name.split(".", 1)
            model = getattr(pipeline, component, None)
            if model is None:
                raise ValueError(f"module {name}: {where} has no {component}")
            weights = dict(model.named_parameters())
            key = next(
                (k for k in (f"{path}.weight", f"{path.removeprefix('text_model.')}.weight") if k in weights), None
            )
            if key is None:
                raise ValueError(f"module {name} does not exist in {where}: wrong base model?")
            if tuple(weights[key].shape) != module.weight_shape:
                shape = tuple(weights[key].shape)
                raise ValueError(f"module {name}: the base weight is {shape} but the LoRA is for {module.weight_shape}")
            weights[key].add_(module.delta().to(weights[key].dtype))
