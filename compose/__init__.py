"""LoRA arithmetic and export: exact weighted sums and scaling of adapters, written for diffusers and SD UIs.

    from compose import load_lora, mix, save_lora
    mixed = mix([load_lora("pickscore.safetensors"), load_lora("hps.safetensors")], [0.7, 0.5])
    save_lora(mixed, "mixed.safetensors", format="kohya")      # AUTOMATIC1111, ComfyUI, Forge, diffusers

Families: SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1 (the base model is inferred from the modules' geometry, see
``compose.geometry``). Formats: kohya, diffusers, peft directories, and the original FLUX/SD3 checkpoint names.
This package depends on neither ``rewards`` nor ``finetune``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compose.formats import load_lora, save_lora
    from compose.lora import LoRA, LoRAModule
    from compose.ops import EnergyReport, mix, scale, svd_rerank

_EXPORTS = {
    "EnergyReport": "compose.ops",
    "LoRA": "compose.lora",
    "LoRAModule": "compose.lora",
    "load_lora": "compose.formats",
    "mix": "compose.ops",
    "save_lora": "compose.formats",
    "scale": "compose.ops",
    "svd_rerank": "compose.ops",
}
__all__ = ["EnergyReport", "LoRA", "LoRAModule", "load_lora", "mix", "save_lora", "scale", "svd_rerank"]


def __getattr__(name: str) -> object:
    """Import the public names on first use (PEP 562): ``python -m compose --help`` does not load torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compose' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
