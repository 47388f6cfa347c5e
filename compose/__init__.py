"""LoRA arithmetic and export: exact weighted sums and scaling of adapters, written for diffusers and SD UIs.

    from compose import load_lora, mix, save_lora
    mixed = mix([load_lora("pickscore.safetensors"), load_lora("hps.safetensors")], [0.7, 0.5])
    save_lora(mixed, "mixed.safetensors", format="kohya")      # AUTOMATIC1111, ComfyUI, Forge, diffusers

Families: SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1 (the base model is inferred from the modules' geometry, see
``compose.geometry``). Formats: kohya, diffusers, peft directories, and the original FLUX/SD3 checkpoint names.
This package depends on neither ``rewards`` nor ``finetune``.
"""

from compose.formats import load_lora, save_lora
from compose.lora import LoRA, LoRAModule
from compose.ops import EnergyReport, mix, scale, svd_rerank

__all__ = ["EnergyReport", "LoRA", "LoRAModule", "load_lora", "mix", "save_lora", "scale", "svd_rerank"]
