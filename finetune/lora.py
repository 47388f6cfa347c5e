"""Saving trained LoRA adapters in the diffusers format (``pipeline.load_lora_weights(DIR)`` loads them)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from finetune.families import Family

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def save_lora_weights(family: Family, directory: Path, text_encoder: bool = False) -> Path:
    """Write the pipeline's trained LoRA (its denoiser's, and the first text encoder's if trained) to
    ``directory/LORA_WEIGHTS_NAME`` through the family's own ``save_lora_weights``, with each adapter's peft config
    (rank, alpha, targets) in the file's ``lora_adapter_metadata`` header so that loaders apply the right scale.
    Written to a temporary file first, then renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    name, denoiser = family.denoiser_name, family.denoiser

    def state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        # As diffusers' training scripts: UNet-family LoRAs in diffusers' key names, transformer families' in peft's
        # (diffusers' conversion renames only some transformer projections, and the SD3 loader misreads the mix).
        state = get_peft_model_state_dict(module)
        return convert_state_dict_to_diffusers(state) if name == "unet" else state

    layers = {f"{name}_lora_layers": state_dict(denoiser)}
    metadata = {f"{name}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict()}
    if text_encoder:
        encoder = family.pipeline.text_encoder
        layers["text_encoder_lora_layers"] = state_dict(encoder)
        metadata["text_encoder_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=directory, prefix=".lora-") as staging:
        family.pipeline_class.save_lora_weights(staging, **layers, **metadata, safe_serialization=True)
        target = directory / LORA_WEIGHTS_NAME
        os.replace(Path(staging) / LORA_WEIGHTS_NAME, target)
    return target
