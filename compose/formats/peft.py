"""peft adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``), e.g. from
``PeftModel.save_pretrained`` on a UNet. Keys ``base_model.model.<module path>.lora_A.weight``; the component is
the UNet unless the config's ``base_model_name_or_path`` says text encoder."""

from __future__ import annotations

import json
from pathlib import Path

from compose.formats import read_safetensors, refuse_unsupported
from compose.formats.diffusers import SUFFIXES, _pattern_value
from compose.lora import LoRA, LoRAModule

PREFIX = "base_model.model."


def read(path: Path) -> LoRA:
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise ValueError(f"{path} is a DoRA adapter (use_dora=true), not a plain LoRA")
    tensors, header = read_safetensors(path / "adapter_model.safetensors")
    refuse_unsupported(tensors, path)
    component = "text_encoder" if "text_encoder" in str(config.get("base_model_name_or_path") or "") else "unet"
    factors: dict[str, dict] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise ValueError(f"{path}: unexpected key {key!r} in a peft LoRA adapter")
        factors.setdefault(key[len(PREFIX) : -len(suffix)], {})[SUFFIXES[suffix]] = tensor
    modules = {}
    for module_path, pair in factors.items():
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module_path) or config["lora_alpha"]
        modules[f"{component}.{module_path}"] = LoRAModule(pair["down"], pair["up"], float(alpha))
    return LoRA(modules, metadata=header)
