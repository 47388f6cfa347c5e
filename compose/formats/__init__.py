"""LoRA file formats: detection, reading and writing. One module per format, each with ``read`` and ``write``."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from compose.lora import LoRA, LoRAModule

UNSUPPORTED = {
    "lora_mid": "LoCon with a Tucker mid factor (lora_mid)",
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    """Tensors and the str->str header of a safetensors file, with a clear error for anything else."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as err:
        raise ValueError(_unreadable(path, err)) from err


def _unreadable(path: Path, err: Exception) -> str:
    return f"{path} is not a readable safetensors file ({err}); is it corrupt or truncated?"


NUMERIC_FIELDS = ("ss_network_dim", "ss_network_alpha")
"""kohya header fields that hold a number (or ``Dynamic``: per-module values)."""
JSON_FIELDS = ("lora_adapter_metadata", "ss_network_args", "draft.merge_recipe")


def clean_metadata(header: dict[str, str], path: Path) -> dict[str, str]:
    """The header without fields that do not parse (each dropped with a warning naming it): they are not used and
    not carried into what compose writes."""
    cleaned = {}
    for key, value in header.items():
        problem = None
        if key in NUMERIC_FIELDS and value != "Dynamic":
            try:
                if not math.isfinite(float(value)):
                    problem = "is not a finite number"
            except ValueError:
                problem = "is not a number"
        elif key in JSON_FIELDS:
            try:
                json.loads(value)
            except ValueError:
                problem = "is not valid JSON"
        if problem:
            warnings.warn(f"{path}: metadata field {key}={value[:80]!r} {problem}; ignored", UserWarning, stacklevel=3)
        else:
            cleaned[key] = value
    return cleaned


def checked_module(path: Path, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> LoRAModule:
    """A ``LoRAModule``, or a ``ValueError`` naming the file and the module for factors that would write a broken
    model: rank 0, NaN or Inf values, a NaN or Inf alpha, mismatched shapes."""
    where = f"{path}: module {name}"
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise ValueError(f"{where}: factors of shapes {tuple(down.shape)} and {tuple(up.shape)} are not a LoRA pair")
    if down.shape[0] == 0 or up.shape[1] == 0:
        raise ValueError(f"{where} has rank 0 (empty factors): the file is damaged; remove the module or re-export it")
    if not math.isfinite(alpha):
        raise ValueError(f"{where} has alpha {alpha}: the file is damaged (a diverged or broken export)")
    for label, factor in (("down", down), ("up", up)):
        if factor.numel() and not math.isfinite(float(factor.abs().amax())):  # one reduction: max propagates NaN
            raise ValueError(
                f"{where}: its {label} factor contains NaN or Inf values: the file is damaged (a diverged "
                f"training run?) and would load as a broken model"
            )
    try:
        return LoRAModule(down, up, float(alpha))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def export_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose {', '.join(DTYPES)}")
    return DTYPES[name]


def refuse_unsupported(keys, path: Path) -> None:
    for key in keys:
        for marker, kind in UNSUPPORTED.items():
            if marker in key:
                raise ValueError(
                    f"{path} is a {kind} adapter (key {key!r}), not a plain LoRA; it cannot be mixed exactly. "
                    f"Convert it to a plain LoRA (e.g. by SVD of its weight deltas) first."
                )


def detect(path: Path) -> str:
    """``kohya``, ``diffusers``, ``original`` (FLUX / SD3 checkpoint names) or ``peft`` (a directory with
    adapter_config.json)."""
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return "peft"
        if (path / "pytorch_lora_weights.safetensors").exists():
            return "diffusers"
        raise ValueError(f"{path} holds neither adapter_config.json (peft) nor pytorch_lora_weights.safetensors")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as err:
        raise ValueError(_unreadable(path, err)) from err
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if keys and all(k.startswith("diffusion_model.") for k in keys):
        return "original"
    if keys and all(k.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    raise ValueError(f"{path}: unrecognised LoRA key layout (first keys: {keys[:3]})")


def load_lora(path: str | Path, base_model: str | None = None) -> LoRA:
    """Read a LoRA in any supported format (detected from the file) and decide its base model from the geometry
    of its modules (``base_model`` chooses where several fit; see ``compose.geometry.resolve_base_model``)."""
    from compose.formats import diffusers, kohya, original, peft
    from compose.geometry import resolve_base_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such LoRA file or directory: {path}")
    readers = {"kohya": kohya.read, "diffusers": diffusers.read, "peft": peft.read, "original": original.read}
    reader = readers[detect(path)]
    lora = reader(path)
    lora.source = str(path)
    return resolve_base_model(lora, base_model)


def save_lora(lora: LoRA, path: str | Path, format: str = "kohya", dtype: str = "fp32", recipe: dict | None = None):
    """Write ``lora`` atomically as ``kohya`` (UIs), ``diffusers`` (``pipeline.load_lora_weights``) or, for FLUX and
    SD3, ``original`` (the checkpoints' own module names, as ComfyUI uses them)."""
    from compose.formats import diffusers, kohya, original

    writers = {"kohya": kohya.write, "diffusers": diffusers.write, "original": original.write}
    if format not in writers:
        raise ValueError(f"unknown export format {format!r}; choose {', '.join(writers)}")
    path = Path(path)
    if format == "diffusers" and path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    writers[format](lora, path, dtype, json.dumps(recipe) if recipe else None)
    return path
