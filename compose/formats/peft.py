"""peft adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``), e.g. from
``PeftModel.save_pretrained`` on a UNet or transformer. Keys ``base_model.model.<module path>.lora_A.weight``; the
component is the UNet unless the config's ``base_model_name_or_path`` names a text encoder or a transformer."""

from __future__ import annotations

import json
from pathlib import Path

from compose.formats import checked_module, clean_metadata, read_safetensors, refuse_unsupported
from compose.formats.config import AdapterConfig
from compose.formats.diffusers import read_factors
from compose.lora import LoRA

PREFIX = "base_model.model."


def read(path: Path) -> LoRA:
    try:
        raw = json.loads((path / "adapter_config.json").read_text())
    except ValueError as err:
        raise ValueError(f"{path / 'adapter_config.json'} is not valid JSON ({err})") from None
    config = AdapterConfig.from_dict(raw, str(path))
    weights = path / "adapter_model.safetensors"
    tensors, header = read_safetensors(weights)
    refuse_unsupported(tensors, path)
    origin = str(raw.get("base_model_name_or_path") or "")
    component = next((c for c in ("text_encoder", "transformer") if c in origin), "unet")
    factors, _ = read_factors(tensors, weights, PREFIX)
    modules = {}
    for module_path, pair in factors.items():
        name = f"{component}.{module_path}"
        rank = pair["down"].shape[0]
        alpha = config.alpha(module_path, rank, f"{path}: module {name}") if rank else 0.0  # rank 0: refused below
        modules[name] = checked_module(path, name, pair["down"], pair["up"], alpha)
    return LoRA(modules, metadata=clean_metadata(header, weights))
