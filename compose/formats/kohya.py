"""kohya-ss / AUTOMATIC1111 LoRA files, which AUTOMATIC1111, Forge, ComfyUI, InvokeAI and diffusers all read.

Key grammar: ``<prefix>_<module path with every "." replaced by "_">`` + ``.lora_down.weight``,
``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank). Prefixes: ``lora_unet`` and ``lora_te`` (SD 1.x/2.x,
diffusers module names). SDXL files (``lora_te1``/``lora_te2`` and Stability-style UNet names) are not handled
yet and are refused with a clear message. Reading maps names back through the real SD module names (built on the
``meta`` device), so an unknown name is an error instead of a silently ignored key.
"""

from __future__ import annotations

import datetime
import functools
from pathlib import Path

import torch
from safetensors.torch import save_file

from compose.files import atomic_write
from compose.formats import export_dtype, read_safetensors, refuse_unsupported
from compose.lora import LoRA, LoRAModule

PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
ARCHITECTURES = {"sd_v1": "stable-diffusion-v1/lora", "sd_v2": "stable-diffusion-v2-512/lora"}
TEXT_ENCODER_LAYERS = 32
"""Upper bound on CLIP text-encoder depth (CLIP-L: 12, OpenCLIP-H in SD 2: 23)."""
TEXT_ENCODER_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def kohya_name(module: str) -> str:
    """``unet.down_blocks.0...to_q`` -> ``lora_unet_down_blocks_0_..._to_q``."""
    component, path = module.split(".", 1)
    if component not in PREFIXES:
        raise ValueError(
            f"module {module}: SDXL's second text encoder has no SD 1.x/2.x kohya name (not supported yet)"
        )
    return f"{PREFIXES[component]}_{path.replace('.', '_')}"


@functools.cache
def known_modules() -> dict[str, str]:
    """kohya name -> module name for every Linear/Conv2d a LoRA can target in SD 1.x/2.x (UNet module names from
    the real SD 1.5 UNet built on the meta device; they are the same in SD 2.x; CLIP text-encoder layers by the
    transformers naming rule)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
        )
    names = [f"unet.{n}" for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for layer in range(TEXT_ENCODER_LAYERS):
        for leaf in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
        ):
            names.append(f"text_encoder.text_model.encoder.layers.{layer}.{leaf}")
    return {kohya_name(n): n for n in names}


def read(path: Path) -> LoRA:
    tensors, header = read_safetensors(path)
    refuse_unsupported(tensors, path)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors) or header.get(
        "ss_base_model_version", ""
    ).startswith("sdxl"):
        raise ValueError(f"{path} is an SDXL kohya LoRA; SDXL files are not supported yet (SD 1.x/2.x only)")
    stems: dict[str, dict] = {}
    for key, tensor in tensors.items():
        stem, _, leaf = key.partition(".")
        if leaf not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise ValueError(f"{path}: unexpected key {key!r} (expected .lora_down.weight, .lora_up.weight, .alpha)")
        stems.setdefault(stem, {})[leaf] = tensor
    modules = {}
    known = known_modules()
    for stem, parts in stems.items():
        if stem not in known:
            raise ValueError(f"{path}: {stem!r} is not an SD 1.x/2.x module name under the kohya grammar")
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{path}: module {stem} lacks its lora_down or lora_up weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts and float(parts["alpha"]) != 0 else float(down.shape[0])
        modules[known[stem]] = LoRAModule(down, up, alpha)
    return LoRA(modules, base_model=header.get("ss_base_model_version"), metadata=header)


def write(lora: LoRA, path: Path, dtype: str = "fp32", recipe: str | None = None) -> None:
    cast = export_dtype(dtype)
    tensors = {}
    for name, module in lora.modules.items():
        stem = kohya_name(name)
        balanced = module.balanced(cast)
        tensors[f"{stem}.lora_down.weight"] = balanced.down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = balanced.up.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(float(balanced.rank), dtype=cast)
    ranks = sorted({m.rank for m in lora.modules.values()})
    dim = str(ranks[0]) if len(ranks) == 1 else "Dynamic"
    base = lora.base_model or "sd_v1"
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
        "ss_base_model_version": base,
        "ss_v2": str(base.startswith("sd_v2")),
        "ss_output_name": path.stem,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURES.get(base, ARCHITECTURES["sd_v1"]),
        "modelspec.implementation": "diffusers",
        "modelspec.title": path.stem,
        "modelspec.date": datetime.date.today().isoformat(),
    }
    if recipe:
        header["draft.merge_recipe"] = recipe
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
