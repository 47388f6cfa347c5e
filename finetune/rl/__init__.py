"""Policy-gradient fine-tuning for rewards without a gradient: DDPO (DDIM families) and Flow-GRPO (flow families).

Both sample stochastic trajectories, record each transition's Gaussian log-probability, score the final images with
the reward as a black box, turn the scores into advantages and minimise PPO's clipped importance-ratio objective
over the recorded transitions (:mod:`finetune.rl.policy`). :mod:`finetune.rl.ddpo` and :mod:`finetune.rl.grpo`
supply the transition (stochastic DDIM, or the flow ODE made an SDE) and the advantages (per-prompt running
statistics, or group-relative).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.rl.ddpo import DDPO
from finetune.rl.grpo import GRPO
from finetune.rl.policy import PolicyGradient

if TYPE_CHECKING:
    from finetune.trainer import Trainer

RL_METHODS: dict[str, type[PolicyGradient]] = {"ddpo": DDPO, "grpo": GRPO}
"""The RL methods by ``--method`` name (``finetune.config.RL_METHOD_NAMES`` lists the same names)."""


def policy_gradient(trainer: Trainer) -> PolicyGradient | None:
    """The trainer's RL method, or ``None`` for a DRaFT-family method (checked against the model family)."""
    cls = RL_METHODS.get(trainer.config.method)
    return None if cls is None else cls(trainer)


__all__ = ["DDPO", "GRPO", "RL_METHODS", "PolicyGradient", "policy_gradient"]
