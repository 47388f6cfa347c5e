"""peft ``LoraConfig`` semantics, for peft adapter directories and diffusers' ``lora_adapter_metadata``: which
scale each module gets (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``), and which
settings change the delta in ways a plain ``alpha / r * up @ down`` cannot express (refused, never ignored)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

REFUSED = {
    "use_dora": "DoRA (a learned magnitude vector rescales each weight)",
    "fan_in_fan_out": "fan_in_fan_out (transposed factors, for GPT-2 style Conv1D layers)",
    "lora_bias": "lora_bias (the up projection has a trained bias)",
    "use_qalora": "QALoRA (pooled inputs)",
    "alora_invocation_tokens": "aLoRA (active only after invocation tokens)",
    "target_parameters": "target_parameters (LoRA on bare parameters, e.g. MoE experts)",
    "layer_replication": "layer_replication (duplicated layers)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA (singular-value adaptation)",
    "arrow_config": "Arrow (routing between adapters)",
    "modules_to_save": "modules_to_save (whole trained layers beside the LoRA)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
}
"""Settings that change the delta (or add to it) beyond ``alpha / r * up @ down``, and what they are."""
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
"""``init_lora_weights`` values that also modify the base weights: the adapter is a delta from a changed base."""


def _set(value) -> bool:
    return value not in (None, False, {}, [], "", ())


@dataclass
class AdapterConfig:
    """One peft ``LoraConfig`` (as a dict): per-module ranks and scales."""

    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False

    @classmethod
    def from_dict(cls, config: dict, where: str) -> AdapterConfig:
        """Validate ``config`` (refusing delta-changing settings, naming them) and keep the scale fields."""
        for key, kind in REFUSED.items():
            if _set(config.get(key)):
                raise ValueError(
                    f"{where}: the adapter config sets {key}={config[key]!r}: {kind}; compose handles plain LoRA "
                    f"only and would mis-apply it. Merge it into the weights with peft instead."
                )
        if config.get("bias", "none") not in ("none", None):
            raise ValueError(f"{where}: the adapter config sets bias={config['bias']!r} (trained biases)")
        init = str(config.get("init_lora_weights", "")).lower()
        if init.startswith(BASE_CHANGING_INITS):
            raise ValueError(
                f"{where}: init_lora_weights={config['init_lora_weights']!r} also changes the base weights, so the "
                f"adapter is a delta from a modified model; convert it to a plain LoRA with peft first "
                f"(path_initial_model_for_weight_conversion)"
            )
        return cls(
            r=config.get("r"),
            lora_alpha=config.get("lora_alpha"),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            use_rslora=bool(config.get("use_rslora")),
        )

    def alpha(self, module_path: str, rank: int, where: str) -> float:
        """The alpha giving the module the scale peft gives it, in compose's ``alpha / rank`` convention:
        ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; patterns override per module."""
        configured_rank = _pattern_value(self.rank_pattern, module_path) or self.r
        if configured_rank is not None and int(configured_rank) != rank:
            raise ValueError(
                f"{where}: the factors have rank {rank} but the adapter config says r={configured_rank}; "
                f"the file and its config disagree"
            )
        alpha = _pattern_value(self.alpha_pattern, module_path)
        alpha = float(alpha if alpha is not None else self.lora_alpha if self.lora_alpha is not None else rank)
        return alpha * math.sqrt(rank) if self.use_rslora else alpha


def _pattern_value(patterns: dict, path: str):
    """peft's rule (``get_pattern_key``): a pattern applies to a module whose name ends with it at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None
