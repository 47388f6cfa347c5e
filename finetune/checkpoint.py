"""Atomic checkpoints: everything is written under a temporary name, then renamed into place.

A checkpoint directory ``checkpoints/step_000100/`` holds ``lora.safetensors`` (the trainable parameters),
``state.pt`` (optimizer, grad scaler, RNG state, the guards' state: base diversity, early-stopping best and
patience count; read back with ``weights_only=True``) and
``trainer_state.json`` (the counters, human-readable); with early stopping, also ``best_lora.safetensors`` (the
trainable parameters at the followed metric's best so far). ``checkpoints/latest`` names the newest complete one; an
interrupted save never changes it, so the previous checkpoint stays usable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compose.files import atomic_write

LORA_FILE = "lora.safetensors"
STATE_FILE = "state.pt"
META_FILE = "trainer_state.json"
BEST_FILE = "best_lora.safetensors"
LATEST = "latest"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_checkpoint(
    root: Path,
    step: int,
    lora: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    best_lora: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, point ``latest`` at it, keep the newest ``keep``.
    ``best_lora``: early stopping's copy of the best parameters, saved beside the current ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step:06d}."))
    try:
        for name, tensors in ((LORA_FILE, lora), (BEST_FILE, best_lora)):
            if tensors is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / name))
        torch.save(state, staging / STATE_FILE)
        (staging / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None``."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / META_FILE).exists() else None


def require_checkpoint(root: Path) -> Path:
    """The newest complete checkpoint under ``root``; ``FileNotFoundError`` for ``--resume`` when there is none."""
    path = latest_checkpoint(root)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {root}; run without --resume to start fresh")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(lora tensors, state, meta)`` of a checkpoint directory."""
    lora = load_file(str(path / LORA_FILE))
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((path / META_FILE).read_text())
    return lora, state, meta


def load_best_lora(path: Path) -> dict[str, torch.Tensor] | None:
    """Early stopping's best parameters saved in a checkpoint directory, or ``None`` if it holds none."""
    best = path / BEST_FILE
    return load_file(str(best)) if best.exists() else None
