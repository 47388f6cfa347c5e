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

from compose.lora import TRAINED_ON, LoRA, LoRAModule


def _label(lora: LoRA, index: int) -> str:
    return lora.source or f"LoRA #{index + 1}"


def _common_base(loras: Sequence[LoRA]) -> tuple[str | None, tuple[str, ...]]:
    """The base model the inputs share (decided, or the geometries all fit), refusing inputs of different base
    models or weight shapes with a message naming both."""
    allowed: tuple[str, ...] | None = None
    first = ""
    for index, lora in enumerate(loras):
        options = (lora.base_model,) if lora.base_model else lora.candidates
        if not options:
            continue  # a custom geometry: the shape check below still applies
        label = f"{_label(lora, index)} ({' or '.join(options)})"
        common = options if allowed is None else tuple(b for b in allowed if b in options)
        if not common:
            raise ValueError(f"the LoRAs are for different base models: {first} and {label}; they cannot be mixed")
        allowed, first = common, first or label
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for index, lora in enumerate(loras):
        for name, module in lora.modules.items():
            expected, where = shapes.setdefault(name, (module.weight_shape, _label(lora, index)))
            if expected != module.weight_shape:
                raise ValueError(
                    f"module {name} has weight shape {expected} in {where} and {module.weight_shape} in "
                    f"{_label(lora, index)}: the LoRAs were trained on different base models"
                )
    if allowed is None:
        return None, ()
    return (allowed[0] if len(allowed) == 1 else None), (allowed if len(allowed) > 1 else ())


def mix(loras: Sequence[LoRA], weights: Sequence[float]) -> LoRA:
    """Exact ``sum_i weights[i] * loras[i]`` by rank concatenation (any real weights, negative included).

    Modules present in only some inputs get only those inputs' blocks.
    """
    if len(loras) != len(weights) or not loras:
        raise ValueError(f"need one weight per LoRA; got {len(loras)} LoRAs and {len(weights)} weights")
    base, candidates = _common_base(loras)
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
    reasons = {lora.base_model_reason for lora in loras if lora.base_model == base and base}
    reason = f"the inputs' ({'; '.join(sorted(reasons))})" if reasons else ""
    trained_on = {lora.metadata.get(TRAINED_ON) for lora in loras}
    metadata = {TRAINED_ON: trained_on.pop()} if len(trained_on) == 1 and None not in trained_on else {}
    return LoRA(modules, base_model=base, metadata=metadata, candidates=candidates, base_model_reason=reason)


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


def _gram(factor: torch.Tensor) -> torch.Tensor:
    """``factor^T @ factor`` in float64 for a factor [n, r] (float64 keeps the small directions of the thin QR)."""
    factor = factor.double()
    return factor.T @ factor


def _orthonormal_bases(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, R)`` for a batch of r x r Gram matrices ``F_i^T F_i``: ``Q_i = F_i @ W_i`` is orthonormal and
    ``F_i = Q_i @ R_i`` (a thin QR of each factor, R not triangular, from one batched ``eigh``). Directions whose
    singular value is below float64 precision of the largest carry no energy: their columns of W and rows of R are
    zero."""
    eigenvalues, vectors = torch.linalg.eigh(grams)
    rank = eigenvalues.shape[1]
    floor = eigenvalues.amax(dim=1, keepdim=True).clamp_min(0) * rank * torch.finfo(torch.float64).eps
    keep = eigenvalues > floor
    root = torch.where(keep, eigenvalues, 1.0).sqrt()
    inverse = torch.where(keep, 1 / root, 0.0)
    return vectors * inverse[:, None, :], (root * keep)[:, :, None] * vectors.transpose(1, 2)


def _rerank_group(modules: list[LoRAModule], rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(up, down, singular values)`` per module of one rank: the best rank-``rank`` factors of each delta (up
    carries the left singular vectors times the root of the singular values, down the rest) and all its singular
    values.

    With a thin QR ``up = Q R``, the delta ``M = s * up @ down`` has ``M M^T = Q C Q^T``, ``C = s^2 R (down
    down^T) R^T`` (r x r): the eigenvectors U of C give M's left singular vectors ``Q U``, its eigenvalues the
    squared singular values, and ``V^T = U^T R (s * down) / sigma``. The cost grows with ``(in + out) * r^2``, never
    with ``in * out``; the r x r problems of all modules of a rank are solved in float64 batches, the factors
    multiplied in float32, the precision they are kept in.
    """
    w_up, r_up = _orthonormal_bases(torch.stack([_gram(m.up.flatten(1)) for m in modules]))
    gram_down = torch.stack([_gram(m.down.flatten(1).T) for m in modules])
    scales = torch.tensor([m.scale for m in modules], dtype=torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(scales[:, None, None] ** 2 * r_up @ gram_down @ r_up.transpose(1, 2))
    singular = eigenvalues.flip(1).clamp_min(0).sqrt()  # descending
    vectors = vectors.flip(2)
    results = []
    for i, module in enumerate(modules):
        up, down = module.up.flatten(1).float(), module.down.flatten(1).float()
        k = min(rank, *up.shape, down.shape[1])
        root = singular[i, :k].sqrt()
        inverse = torch.where(root > 0, scales[i] / root.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        new_up = up @ (w_up[i] @ (vectors[i, :, :k] * root)).float()
        new_down = (inverse[:, None] * (vectors[i, :, :k].T @ r_up[i])).float() @ down
        results.append((new_up, new_down, singular[i]))
    return results


def svd_rerank(lora: LoRA, rank: int) -> tuple[LoRA, EnergyReport]:
    """Re-factorise every module's delta to at most ``rank`` by SVD (lossy); exact where the delta's rank <= rank.

    The truncation is the dense SVD's (the best rank-``rank`` approximation), computed in float64 from the
    factors alone, so it stays fast on SDXL and FLUX widths.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1; got {rank}")
    modules, kept, total_kept, total = {}, {}, 0.0, 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # r x r problems are too small to share: thread hand-offs cost 20x on a busy CPU
    try:
        by_rank: dict[int, list[str]] = {}
        for name, module in lora.modules.items():
            by_rank.setdefault(module.rank, []).append(name)
        factors = {}
        for names in by_rank.values():
            factors.update(zip(names, _rerank_group([lora.modules[n] for n in names], rank), strict=True))
    finally:
        torch.set_num_threads(threads)
    for name, module in lora.modules.items():
        up, down, s = factors[name]
        k = up.shape[1]
        up, down = up.float(), down.float()
        shape = module.weight_shape
        if len(shape) == 4:
            up, down = up.reshape(shape[0], k, 1, 1), down.reshape(k, *shape[1:])
        modules[name] = LoRAModule(down, up, alpha=float(k))
        energy = float((s**2).sum())
        kept_energy = float((s[:k] ** 2).sum())
        kept[name] = kept_energy / energy if energy > 0 else 1.0
        total_kept, total = total_kept + kept_energy, total + energy
    report = EnergyReport(kept, total_kept / total if total > 0 else 1.0)
    reranked = LoRA(modules, base_model=lora.base_model, metadata=dict(lora.metadata), candidates=lora.candidates)
    reranked.base_model_reason = lora.base_model_reason
    return reranked, report
