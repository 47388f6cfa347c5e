"""LoRA arithmetic: exact weighted sums (rank concatenation), scaling, and SVD re-factorisation to a target rank.

The weighted sum of LoRAs ``sum_i w_i * delta_i`` is what stacking adapters computes in diffusers
(``set_adapters``), ComfyUI and AUTOMATIC1111. Summing the A and B factors separately is wrong (cross terms);
concatenating them is exact: ``down = [c_i A_i]`` (rows), ``up = [d_i B_i]`` (columns) with ``c_i d_i = w_i s_i``,
rank ``sum r_i``, alpha = rank (scale 1). The magnitude ``sqrt|w_i s_i|`` goes on both factors (the sign on
``up``) so that half-precision exports neither overflow nor underflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compose.lora import LoRA, LoRAModule


def _check_compatible(loras: Sequence[LoRA]) -> str | None:
    bases = {lora.base_model for lora in loras if lora.base_model}
    if len(bases) > 1:
        raise ValueError(f"the LoRAs are for different base models ({', '.join(sorted(bases))}); they cannot be mixed")
    shapes: dict[str, tuple[int, ...]] = {}
    for lora in loras:
        for name, module in lora.modules.items():
            expected = shapes.setdefault(name, module.weight_shape)
            if expected != module.weight_shape:
                raise ValueError(
                    f"module {name} has weight shape {expected} in one LoRA and {module.weight_shape} in another: "
                    f"the LoRAs were trained on different base models"
                )
    return next(iter(bases), None)


def mix(loras: Sequence[LoRA], weights: Sequence[float]) -> LoRA:
    """Exact ``sum_i weights[i] * loras[i]`` by rank concatenation (any real weights, negative included).

    Modules present in only some inputs get only those inputs' blocks.
    """
    if len(loras) != len(weights) or not loras:
        raise ValueError(f"need one weight per LoRA; got {len(loras)} LoRAs and {len(weights)} weights")
    base = _check_compatible(loras)
    names = list(dict.fromkeys(name for lora in loras for name in lora.modules))
    modules = {}
    for name in names:
        downs, ups = [], []
        for lora, weight in zip(loras, weights, strict=True):
            module = lora.modules.get(name)
            if module is None or weight == 0:
                continue
            factor = weight * module.scale
            magnitude = math.sqrt(abs(factor))
            downs.append(module.down.float() * magnitude)
            ups.append(module.up.float() * math.copysign(magnitude, factor))
        if downs:
            down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
            modules[name] = LoRAModule(down, up, alpha=float(down.shape[0]))
    return LoRA(modules, base_model=base)


def scale(lora: LoRA, by: float) -> LoRA:
    """``by * lora``: 0 is the base model, 1 the LoRA, values between interpolate, > 1 extrapolates."""
    scaled = mix([lora], [by])
    scaled.metadata = dict(lora.metadata)
    return scaled


@dataclass(frozen=True)
class EnergyReport:
    """Fraction of each module's squared singular values kept by an SVD re-factorisation, and overall."""

    per_module: dict[str, float]
    overall: float


def svd_rerank(lora: LoRA, rank: int) -> tuple[LoRA, EnergyReport]:
    """Re-factorise every module's delta to at most ``rank`` by SVD (lossy); exact where the delta's rank <= rank."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1; got {rank}")
    modules, kept, total_kept, total = {}, {}, 0.0, 0.0
    for name, module in lora.modules.items():
        delta = module.delta().flatten(1).double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        up = (u[:, :k] * root).float()
        down = (root[:, None] * vh[:k]).float()
        shape = module.weight_shape
        if len(shape) == 4:
            up, down = up.reshape(shape[0], k, 1, 1), down.reshape(k, *shape[1:])
        modules[name] = LoRAModule(down, up, alpha=float(k))
        energy = float((s**2).sum())
        kept_energy = float((s[:k] ** 2).sum())
        kept[name] = kept_energy / energy if energy > 0 else 1.0
        total_kept, total = total_kept + kept_energy, total + energy
    report = EnergyReport(kept, total_kept / total if total > 0 else 1.0)
    return LoRA(modules, base_model=lora.base_model, metadata=dict(lora.metadata)), report
