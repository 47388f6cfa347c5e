"""SD3/SD3.5 and FLUX.1 module names of the original checkpoints (Stability's MMDiT ``joint_blocks``, Black Forest
Labs' ``double_blocks``/``single_blocks``), which ComfyUI and Forge use internally and kohya-ss/sd-scripts writes
(as ``lora_unet_<name with _>``), and the exact conversion between their fused projections and diffusers'
separate ones.

Fused layers: FLUX ``img_attn.qkv`` = diffusers ``to_q``, ``to_k``, ``to_v`` (rows stacked), ``single_blocks.N.linear1``
= ``to_q``, ``to_k``, ``to_v``, ``proj_mlp``; SD3 ``attn.qkv`` likewise. Separate -> fused stacks the down factors
and puts the up factors block-diagonally (ranks add up); fused -> separate shares the down factor and splits the up
factor's rows (keeping only the columns a part uses). Both are exact. The final adaptive norm (and SD3's last,
pre-only context norm) orders its output (shift, scale) in the original and (scale, shift) in diffusers: the up
rows' halves are swapped.

The file format ``original`` here: keys ``diffusion_model.<original name>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha`` (the prefix ComfyUI maps onto its model), denoiser only.
"""

from __future__ import annotations

import datetime
import functools
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from compose.files import atomic_write
from compose.formats import checked_module, clean_metadata, export_dtype, read_safetensors, refuse_unsupported
from compose.lora import LoRA, LoRAModule

MAX_BLOCKS = 64
"""Block indices are enumerated up to this (FLUX.1 has 19 + 38, SD3.5-large 38)."""
QKV = (1, 1, 1)
"""Output widths of the fused parts, in multiples of the input width: q, k, v."""
QKV_MLP = (1, 1, 1, 4)
"""FLUX single blocks' ``linear1``: q, k, v and the MLP input (mlp_ratio 4)."""

FLUX_BLOCKS = {
    "double_blocks.{i}": (
        ("img_attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                          "transformer_blocks.{i}.attn.to_v")),
        ("img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",)),
        ("img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",)),
        ("img_mlp.2", ("transformer_blocks.{i}.ff.net.2",)),
        ("img_mod.lin", ("transformer_blocks.{i}.norm1.linear",)),
        ("txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
                          "transformer_blocks.{i}.attn.add_v_proj")),
        ("txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",)),
        ("txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",)),
        ("txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",)),
        ("txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",)),
    ),
    "single_blocks.{i}": (
        ("linear1", ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                     "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp")),
        ("linear2", ("single_transformer_blocks.{i}.proj_out",)),
        ("modulation.lin", ("single_transformer_blocks.{i}.norm.linear",)),
    ),
}  # fmt: skip
FLUX_FIXED = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SD3_BLOCKS = {
    "joint_blocks.{i}": (
        ("x_block.attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                              "transformer_blocks.{i}.attn.to_v")),
        ("x_block.attn.proj", ("transformer_blocks.{i}.attn.to_out.0",)),
        ("x_block.attn2.qkv", ("transformer_blocks.{i}.attn2.to_q", "transformer_blocks.{i}.attn2.to_k",
                               "transformer_blocks.{i}.attn2.to_v")),
        ("x_block.attn2.proj", ("transformer_blocks.{i}.attn2.to_out.0",)),
        ("x_block.mlp.fc1", ("transformer_blocks.{i}.ff.net.0.proj",)),
        ("x_block.mlp.fc2", ("transformer_blocks.{i}.ff.net.2",)),
        ("x_block.adaLN_modulation.1", ("transformer_blocks.{i}.norm1.linear",)),
        ("context_block.attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
                                    "transformer_blocks.{i}.attn.add_v_proj")),
        ("context_block.attn.proj", ("transformer_blocks.{i}.attn.to_add_out",)),
        ("context_block.mlp.fc1", ("transformer_blocks.{i}.ff_context.net.0.proj",)),
        ("context_block.mlp.fc2", ("transformer_blocks.{i}.ff_context.net.2",)),
        ("context_block.adaLN_modulation.1", ("transformer_blocks.{i}.norm1_context.linear",)),
    ),
}  # fmt: skip
SD3_FIXED = {
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SWAPPED = ("final_layer.adaLN_modulation.1", "context_block.adaLN_modulation.1")
"""Adaptive norms whose (shift, scale) halves diffusers stores as (scale, shift) when they are the continuous kind
(2 x width outputs: the final norm, SD3's last context norm); the 6 x width zero-norms share the original order."""


@functools.cache
def name_table(family: str) -> dict[str, tuple[str, ...]]:
    """Original module name -> the diffusers transformer module names it holds (several: fused, in row order)."""
    blocks, fixed = (FLUX_BLOCKS, FLUX_FIXED) if family == "flux" else (SD3_BLOCKS, SD3_FIXED)
    table = {original: (f"transformer.{name}",) for original, name in fixed.items()}
    for block, layers in blocks.items():
        for i in range(MAX_BLOCKS):
            for leaf, parts in layers:
                table[f"{block.format(i=i)}.{leaf}"] = tuple(f"transformer.{p.format(i=i)}" for p in parts)
    return table


@functools.cache
def _part_index(family: str) -> dict[str, tuple[str, int]]:
    return {part: (original, i) for original, parts in name_table(family).items() for i, part in enumerate(parts)}


def _swapped(original: str, out: int, width: int) -> bool:
    return original.endswith(SWAPPED) and out == 2 * width


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


def fuse(modules: dict[str, LoRAModule], family: str) -> dict[str, LoRAModule]:
    """diffusers transformer modules -> original modules (exact): fused layers get stacked downs and block-diagonal
    ups, zero rows for parts the LoRA does not cover. Other components pass through unchanged."""
    index = _part_index(family)
    groups: dict[str, dict[int, LoRAModule]] = {}
    fused: dict[str, LoRAModule] = {}
    for name, module in modules.items():
        if not name.startswith("transformer."):
            fused[name] = module
            continue
        if name not in index:
            raise ValueError(
                f"module {name} has no name in the original {family.upper()} checkpoint layout; export it in the "
                f"diffusers format instead"
            )
        original, part = index[name]
        groups.setdefault(original, {})[part] = module
    for original, parts in groups.items():
        count = len(name_table(family)[original])
        width = next(iter(parts.values())).down.flatten(1).shape[1]
        if count == 1:
            module = parts[0]
            if _swapped(original, module.up.shape[0], width):
                module = LoRAModule(module.down, _swap_halves(module.up), module.alpha)
            fused[original] = module
            continue
        multiples = QKV_MLP if count == 4 else QKV
        balanced = {i: m.balanced() for i, m in parts.items()}
        rank = sum(m.rank for m in balanced.values())
        down = torch.cat([balanced[i].down for i in sorted(balanced)])
        up = torch.zeros(sum(multiples) * width, rank)
        row = column = 0
        for i, multiple in enumerate(multiples):
            if i in balanced:
                block = balanced[i].up
                if block.shape[0] != multiple * width:
                    raise ValueError(
                        f"{name_table(family)[original][i]}: output width {block.shape[0]} does not fit the fused "
                        f"layer {original} (input width {width})"
                    )
                up[row : row + block.shape[0], column : column + block.shape[1]] = block
                column += block.shape[1]
            row += multiple * width
        fused[original] = LoRAModule(down, up, float(rank))
    return fused


def split(original: str, module: LoRAModule, family: str) -> dict[str, LoRAModule]:
    """An original module -> its diffusers module(s) (exact): the down factor is shared, the up factor's rows are
    split; each part keeps only the rank columns it uses, and a part with none (all-zero rows) is left out."""
    parts = name_table(family)[original]
    width = module.down.flatten(1).shape[1]
    if len(parts) == 1:
        up = _swap_halves(module.up) if _swapped(original, module.up.shape[0], width) else module.up
        return {parts[0]: LoRAModule(module.down, up, module.alpha)}
    multiples = QKV_MLP if len(parts) == 4 else QKV
    if module.up.shape[0] != sum(multiples) * width:
        raise ValueError(
            f"{original}: up factor has {module.up.shape[0]} rows; a fused layer of input width {width} has "
            f"{sum(multiples) * width}"
        )
    result, row = {}, 0
    for part, multiple in zip(parts, multiples, strict=True):
        rows = module.up[row : row + multiple * width]
        row += multiple * width
        used = rows.ne(0).any(dim=0)
        if not bool(used.any()):
            continue
        rank = int(used.sum())
        result[part] = LoRAModule(module.down[used], rows[:, used], module.scale * rank)
    return result


def family_of_names(names) -> str | None:
    """``flux`` or ``sd3`` from original module names, or ``None``."""
    for name in names:
        if re.match(r"(double|single)_blocks[._]", name):
            return "flux"
        if re.match(r"joint_blocks[._]", name):
            return "sd3"
    return None


PREFIX = "diffusion_model."


def read(path: Path) -> LoRA:
    tensors, header = read_safetensors(path)
    refuse_unsupported(tensors, path)
    stems: dict[str, dict] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if match is None:
            raise ValueError(f"{path}: unexpected key {key!r} (expected {PREFIX}<name>.lora_down.weight, ...)")
        stems.setdefault(match[1], {})[match[2]] = tensor
    family = family_of_names(stems)
    if family is None:
        raise ValueError(f"{path}: keys name neither FLUX (double_blocks) nor SD3 (joint_blocks) modules")
    modules: dict[str, LoRAModule] = {}
    for stem, parts in stems.items():
        modules.update(original_module(path, stem, parts, family))
    return LoRA(modules, metadata=clean_metadata(header, path))


def original_module(path: Path, stem: str, parts: dict, family: str, label: str | None = None) -> dict:
    """The diffusers modules of one original-named module's ``lora_down``/``lora_up``/``alpha`` tensors."""
    label = label or stem
    if stem not in name_table(family):
        raise ValueError(f"{path}: {label!r} is not a {family.upper()} module name")
    if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        raise ValueError(f"{path}: module {label} lacks its lora_down or lora_up weight")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    alpha = float(parts["alpha"]) if "alpha" in parts and float(parts["alpha"]) != 0 else float(down.shape[0])
    return split(stem, checked_module(path, label, down, up, alpha), family)


def write_tensors(modules: dict[str, LoRAModule], name, cast: torch.dtype) -> dict[str, torch.Tensor]:
    """``<name(module)>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` tensors, scale 1, balanced."""
    tensors = {}
    for module_name, module in modules.items():
        stem = name(module_name)
        balanced = module.balanced(cast)
        tensors[f"{stem}.lora_down.weight"] = balanced.down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = balanced.up.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(float(balanced.rank), dtype=cast)
    return tensors


def write(lora: LoRA, path: Path, dtype: str = "fp32", recipe: str | None = None) -> None:
    from compose.formats.kohya import header_for, transformer_family

    family = transformer_family(lora)
    others = [name for name in lora.modules if not name.startswith("transformer.")]
    if others:
        raise ValueError(
            f"the original layout holds the denoiser only, and this LoRA has text-encoder modules ({others[0]}, ...);"
            f" export it as kohya or diffusers"
        )
    tensors = write_tensors(fuse(lora.modules, family), lambda name: PREFIX + name, export_dtype(dtype))
    header = header_for(lora, path, family, datetime.date.today())
    if recipe:
        header["draft.merge_recipe"] = recipe
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
