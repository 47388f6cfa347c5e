"""diffusers / peft-keyed LoRA files (``pytorch_lora_weights.safetensors``), as ``pipeline.load_lora_weights`` reads.

Keys ``<component>.<module path>.lora_A.weight`` (down) and ``.lora_B.weight`` (up); ``.lora.down.weight`` and
``.lora.up.weight`` are read too. There is no alpha tensor:
the scale comes from the ``lora_adapter_metadata`` header (the peft ``LoraConfig`` of each component, flattened
as ``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern``); without it, alpha = rank.
Files written here bake every scale into the factors (alpha = rank) and still write the header with each
module's rank, so loaders that infer one rank for all modules cannot mis-scale them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file

from compose.files import atomic_write
from compose.formats import export_dtype, read_safetensors, refuse_unsupported
from compose.lora import LoRA, LoRAModule

SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}
"""peft names, and the older diffusers names that ``save_lora_weights`` still writes."""


def _pattern_value(patterns: dict, path: str):
    """peft's rule: a pattern key applies to a module whose name ends with it (at a dot boundary)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


def read(path: Path) -> LoRA:
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    tensors, header = read_safetensors(path)
    refuse_unsupported(tensors, path)
    configs = json.loads(header.get("lora_adapter_metadata", "{}"))
    factors: dict[str, dict] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(
                f"{path}: unexpected key {key!r} in a diffusers LoRA file (expected one of {', '.join(SUFFIXES)})"
            )
        factors.setdefault(key[: -len(suffix)], {})[SUFFIXES[suffix]] = tensor
    modules = {}
    for name, pair in factors.items():
        if set(pair) != {"down", "up"}:
            raise ValueError(f"{path}: module {name} has only its {', '.join(pair)} factor")
        component, module_path = name.split(".", 1)
        rank = pair["down"].shape[0]
        alpha = _pattern_value(configs.get(f"{component}.alpha_pattern", {}), module_path)
        if alpha is None:
            has_config = f"{component}.lora_alpha" in configs
            alpha = configs[f"{component}.lora_alpha"] if has_config else rank
            config_rank = _pattern_value(configs.get(f"{component}.rank_pattern", {}), module_path)
            if has_config and (config_rank or configs.get(f"{component}.r")) != rank:
                raise ValueError(f"{path}: module {name} has rank {rank} but the header says otherwise")
        modules[name] = LoRAModule(pair["down"], pair["up"], float(alpha))
    return LoRA(modules, metadata={k: v for k, v in header.items() if k not in ("format", "lora_adapter_metadata")})


def write(lora: LoRA, path: Path, dtype: str = "fp32", recipe: str | None = None) -> None:
    cast = export_dtype(dtype)
    tensors, configs = {}, {}
    by_component: dict[str, dict[str, int]] = {}
    for name, module in lora.modules.items():
        balanced = module.balanced(cast)
        tensors[f"{name}.lora_A.weight"] = balanced.down.contiguous()
        tensors[f"{name}.lora_B.weight"] = balanced.up.contiguous()
        component, module_path = name.split(".", 1)
        # Patterns match name suffixes: without "text_model." they fit transformers 4 and 5 module names alike.
        by_component.setdefault(component, {})[module_path.removeprefix("text_model.")] = balanced.rank
    for component, ranks in by_component.items():
        common = Counter(ranks.values()).most_common(1)[0][0]
        configs.update(
            {
                f"{component}.r": common,
                f"{component}.lora_alpha": common,
                f"{component}.rank_pattern": {p: r for p, r in ranks.items() if r != common},
                f"{component}.alpha_pattern": {p: r for p, r in ranks.items() if r != common},
                f"{component}.target_modules": sorted(ranks),
                f"{component}.use_dora": False,
            }
        )
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(configs)}
    if recipe:
        header["draft.merge_recipe"] = recipe
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
