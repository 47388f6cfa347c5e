"""Saving trained LoRA adapters in the diffusers format (``pipeline.load_lora_weights(DIR)`` loads them), and the
base model seen through the adapted one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from compose.lora import TRAINED_ON
from finetune.families import Family

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


@contextlib.contextmanager
def adapters_disabled(*modules: torch.nn.Module) -> Iterator[None]:
    """The base model: the modules' LoRA adapters off inside (no second copy of the weights), back on after
    (diffusers' ``disable_adapters``/``enable_adapters``)."""
    for module in modules:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in modules:
            module.enable_adapters()


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
        staged = Path(staging) / LORA_WEIGHTS_NAME
        record_base_model(staged, family.pipeline)
        target = directory / LORA_WEIGHTS_NAME
        os.replace(staged, target)
    return target


def base_model_name(pipeline: object) -> str | None:
    """The model a pipeline was loaded from: its hub id, or a local directory's name (not the whole path, which
    says nothing on another machine); ``None`` for a pipeline built in memory."""
    source = getattr(pipeline, "name_or_path", None)
    if not source:
        return None
    return Path(source).name if Path(source).is_dir() else str(source)


def record_base_model(path: Path, pipeline: object) -> None:
    """Add the base model's name to a LoRA file's header (kohya's ``ss_sd_model_name``, which ``compose`` carries
    into its exports and UIs show), so the file says what it was trained on."""
    name = base_model_name(pipeline)
    if name is None:
        return
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={**header, TRAINED_ON: name})
