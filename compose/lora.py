"""The in-memory LoRA: per target module, the two factors and the scale, keyed by the module's base-model name.

A module name is the component followed by the diffusers module path, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``, ``transformer.transformer_blocks.0.attn.to_q``
(SD3, FLUX) or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``. Every reader produces this and every writer
consumes it, so formats only translate names and the scale convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def canonical_name(name: str) -> str:
    """Text-encoder module names in the usual ``text_model.encoder...`` form (transformers 5 drops ``text_model``)."""
    for component in ("text_encoder.", "text_encoder_2."):
        if name.startswith(component + "encoder."):
            return component + "text_model." + name[len(component) :]
    return name


TRAINED_ON = "ss_sd_model_name"
"""Metadata key (kohya's) naming the model a LoRA was trained on: the trainer records it, mixes of LoRAs that agree
on it keep it, and kohya exports carry it."""


@dataclass
class LoRAModule:
    """``delta = alpha / rank * up @ down`` for one target module (computed in float32).

    ``down``: [rank, in] for a Linear, [rank, in, kh, kw] for a Conv2d; ``up``: [out, rank] or [out, rank, 1, 1].
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.shape[0] != self.up.shape[1]:
            raise ValueError(
                f"LoRA factors disagree on the rank: down {tuple(self.down.shape)}, up {tuple(self.up.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight this LoRA modifies."""
        return (self.up.shape[0], *self.down.shape[1:])

    def balanced(self, dtype: torch.dtype = torch.float32) -> LoRAModule:
        """The same delta with alpha = rank (scale 1) and the scale's magnitude split evenly over both factors,
        cast to ``dtype``: the form every writer uses, safe for half precision."""
        root = abs(self.scale) ** 0.5
        sign = 1.0 if self.scale >= 0 else -1.0
        return LoRAModule(
            (self.down.float() * root).to(dtype), (self.up.float() * (sign * root)).to(dtype), float(self.rank)
        )

    def delta(self) -> torch.Tensor:
        """The weight update, shaped like the target weight, in float32."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (self.scale * product).reshape(self.weight_shape)


@dataclass
class LoRA:
    """A set of LoRA modules plus what is known of the base model and the file's metadata."""

    modules: dict[str, LoRAModule]
    base_model: str | None = None
    """A ``compose.geometry.BASE_MODELS`` id (``sd_v1``, ``sdxl_base_v1-0``, ``flux-1-dev``...) or ``None``."""
    metadata: dict[str, str] = field(default_factory=dict)
    candidates: tuple[str, ...] = ()
    """Base models whose geometry fits the modules (empty: not inferred, or a custom geometry)."""
    base_model_reason: str = ""
    """How ``base_model`` was decided, for ``inspect``."""
    source: str | None = None
    """The file it was read from, for messages."""

    def __post_init__(self) -> None:
        self.modules = {canonical_name(name): module for name, module in self.modules.items()}
        for name in self.modules:
            if name.split(".", 1)[0] not in COMPONENTS:
                raise ValueError(f"LoRA module name {name!r} must start with one of {', '.join(COMPONENTS)}")

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: module.delta() for name, module in self.modules.items()}

    def summary(self) -> dict[str, object]:
        """Counts, ranks and alphas, for ``python -m compose inspect``."""
        ranks = sorted({m.rank for m in self.modules.values()})
        alphas = sorted({m.alpha for m in self.modules.values()})
        per_component: dict[str, int] = {}
        for name in self.modules:
            component = name.split(".", 1)[0]
            per_component[component] = per_component.get(component, 0) + 1
        return {
            "base_model": self.base_model,
            "base_model_decided_by": self.base_model_reason,
            "geometry_fits": list(self.candidates),
            "modules": per_component,
            "ranks": ranks,
            "alphas": alphas,
        }
