"""diffusers / peft-keyed LoRA files (``pytorch_lora_weights.safetensors``), as ``pipeline.load_lora_weights`` reads.

Keys ``<component>.<module path>.lora_A.weight`` (down) and ``.lora_B.weight`` (up); ``.lora.down.weight`` and
``.lora.up.weight`` are read too. There is no alpha tensor:
the scale comes from the ``lora_adapter_metadata`` header (the peft ``LoraConfig`` of each component, flattened
as ``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern``, ``unet.use_rslora``; see
``compose.formats.config``); without it, alpha = rank. The trainer's checkpoints (``lora.safetensors`` with
``.lora_A.default.weight`` keys) take their scale from the run's ``training_config.yaml``.
Files written here bake every scale into the factors (alpha = rank) and still write the header with each
module's rank, so loaders that infer one rank for all modules cannot mis-scale them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

import yaml
from safetensors.torch import save_file

from compose.files import atomic_write
from compose.formats import checked_module, clean_metadata, export_dtype, read_safetensors, refuse_unsupported
from compose.formats.config import AdapterConfig
from compose.lora import LoRA

KEY = re.compile(
    r"(?P<module>.+?)\.(?:(?P<peft>lora_[AB])(?:\.(?P<adapter>[^.]+))?|lora\.(?P<old>down|up)"
    r"|lora_linear_layer\.(?P<linear>down|up))\.weight"
)
"""peft names (``.lora_A.weight``; ``.lora_A.<adapter>.weight`` in a model's own state dict, as the trainer's
checkpoints hold), and the older diffusers names that ``save_lora_weights`` still reads."""
CHECKPOINT_CONFIG = "training_config.yaml"
"""The trainer's run configuration, two levels above ``checkpoints/step_N/lora.safetensors``."""


def split_key(key: str) -> tuple[str, str, str | None] | None:
    """``(module name, "down" or "up", adapter name or None)`` of a factor key, or ``None``."""
    match = KEY.fullmatch(key)
    if match is None:
        return None
    if match["peft"]:
        return match["module"], "down" if match["peft"] == "lora_A" else "up", match["adapter"]
    return match["module"], match["old"] or match["linear"], None


def read_factors(tensors: dict, path: Path, prefix: str = "") -> tuple[dict[str, dict], set]:
    """``{module: {"down": tensor, "up": tensor}}`` and the adapter names seen, for peft/diffusers-named keys."""
    factors: dict[str, dict] = {}
    adapters = set()
    for key, tensor in tensors.items():
        parts = split_key(key) if key.startswith(prefix) else None
        if parts is None:
            raise ValueError(
                f"{path}: unexpected key {key!r} in a peft/diffusers LoRA file (expected {prefix}<module>.lora_A."
                f"weight and .lora_B.weight)"
            )
        module, factor, adapter = parts
        adapters.add(adapter)
        factors.setdefault(module[len(prefix) :], {})[factor] = tensor
    if len(adapters) > 1:
        raise ValueError(f"{path} holds several adapters ({', '.join(sorted(map(str, adapters)))}); save one at a time")
    for name, pair in factors.items():
        if set(pair) != {"down", "up"}:
            raise ValueError(f"{path}: module {name} has only its {', '.join(pair)} factor")
    return factors, adapters


def _checkpoint_config(path: Path) -> AdapterConfig | None:
    """Rank and alpha of a trainer checkpoint (``<run>/checkpoints/step_N/lora.safetensors``): its file holds the
    model's parameters only, the run's ``training_config.yaml`` the scale."""
    config_path = path.parent.parent.parent / CHECKPOINT_CONFIG
    if not config_path.exists():
        return None
    config = yaml.safe_load(config_path.read_text()) or {}
    rank = config.get("lora_rank")
    alpha = config.get("lora_alpha")
    return AdapterConfig(r=rank, lora_alpha=alpha if alpha is not None else rank)


def read(path: Path) -> LoRA:
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    tensors, header = read_safetensors(path)
    refuse_unsupported(tensors, path)
    metadata = clean_metadata(header, path)
    configs = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    if "lora_adapter_metadata" in header and "lora_adapter_metadata" not in metadata:
        warnings.warn(f"{path}: without its adapter config, each module's alpha is taken as its rank", stacklevel=2)
    factors, adapters = read_factors(tensors, path)
    components: dict[str, AdapterConfig | None] = {}
    for component in {name.split(".", 1)[0] for name in factors}:
        config = {k[len(component) + 1 :]: v for k, v in configs.items() if k.startswith(component + ".")}
        components[component] = AdapterConfig.from_dict(config, f"{path} ({component})") if config else None
    if adapters != {None} and not configs:  # a model's own state dict: the trainer's checkpoint
        checkpoint = _checkpoint_config(path)
        if checkpoint is None:
            warnings.warn(
                f"{path}: peft parameters without an adapter config (no lora_adapter_metadata, no "
                f"{CHECKPOINT_CONFIG} two directories up): each module's alpha is taken as its rank",
                stacklevel=2,
            )
        components = dict.fromkeys(components, checkpoint)
    modules = {}
    for name, pair in factors.items():
        component, module_path = name.split(".", 1)
        rank = pair["down"].shape[0]
        config = components[component]
        alpha = config.alpha(module_path, rank, f"{path}: module {name}") if config and rank else rank
        modules[name] = checked_module(path, name, pair["down"], pair["up"], alpha)
    kept = {k: v for k, v in metadata.items() if k not in ("format", "lora_adapter_metadata")}
    return LoRA(modules, metadata=kept)


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
