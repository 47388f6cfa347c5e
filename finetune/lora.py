"""Saving trained LoRA adapters in the diffusers format (``pipeline.load_lora_weights(DIR)`` loads them)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def save_lora_weights(pipeline: StableDiffusionPipeline, directory: Path, text_encoder: bool = False) -> Path:
    """Write the pipeline's trained LoRA (UNet, and text encoder if trained) to ``directory/LORA_WEIGHTS_NAME``,
    with each adapter's peft config (rank, alpha, targets) in the file's ``lora_adapter_metadata`` header so that
    loaders apply the right scale. Written to a temporary file first, then renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    unet = pipeline.unet
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    metadata = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    if text_encoder:
        encoder = pipeline.text_encoder
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
        metadata["text_encoder_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=directory, prefix=".lora-") as staging:
        StableDiffusionPipeline.save_lora_weights(staging, **layers, **metadata, safe_serialization=True)
        target = directory / LORA_WEIGHTS_NAME
        os.replace(Path(staging) / LORA_WEIGHTS_NAME, target)
    return target
