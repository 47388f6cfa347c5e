"""Weighted multi-reward objectives: ``0.7 * aesthetic + 0.3 * pickscore`` as one ``Reward``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from rewards.base import Reward
from rewards.text import PromptProcessor


class CombinedReward(Reward):
    """``sum_i w_i * (r_i - mean_i) / std_i`` over member rewards.

    ``mean_i, std_i`` default to ``(0, 1)`` (plain weighted sum); ``combine(..., normalize=True)`` uses each
    member's documented ``normalization`` instead, so that weights mean something across rewards whose scales
    differ. The raw (unweighted, unnormalised) score of each member in the last call is kept, detached, in
    ``last_scores`` for logging.
    """

    def __init__(
        self,
        members: Mapping[str, Reward],
        weights: Mapping[str, float],
        normalization: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("a combined reward needs at least one member")
        if set(weights) != set(members):
            raise ValueError(f"weights {sorted(weights)} do not match members {sorted(members)}")
        # A ModuleList, not a ModuleDict: member names such as "hpsv2.1" may contain dots.
        self._modules_list = nn.ModuleList(members.values())
        self.keys = list(members)
        self.weights = {k: float(v) for k, v in weights.items()}
        self.member_normalization = {k: (0.0, 1.0) for k in members}
        for key, (mean, std) in (normalization or {}).items():
            if key not in members:
                raise ValueError(f"normalization given for '{key}', which is not a member of {sorted(members)}")
            if std <= 0:
                raise ValueError(f"normalization std for '{key}' must be positive; got {std}")
            self.member_normalization[key] = (float(mean), float(std))
        self.last_scores: dict[str, torch.Tensor] = {}
        self.name = " + ".join(f"{self.weights[k]:g}*{k}" for k in self.keys)
        self.freeze()

    @property
    def members(self) -> dict[str, Reward]:
        """Member rewards by name, in insertion order."""
        return dict(zip(self.keys, self._modules_list, strict=True))

    @property
    def needs_prompts(self) -> bool:
        return any(m.needs_prompts for m in self.members.values())

    @property
    def differentiable(self) -> bool:
        """A mix is differentiable only if every member is: a gradient without a member's term would be that of
        another objective, so a mix with a non-differentiable member scores with autograd off, as that member does."""
        return all(m.differentiable for m in self.members.values())

    @classmethod
    def of(cls, reward: Reward) -> CombinedReward:
        """View any reward as a combination (a single member with weight 1 if it is not one already)."""
        if isinstance(reward, CombinedReward):
            return cls(reward.members, reward.weights, reward.member_normalization)
        return cls({reward.name: reward}, {reward.name: 1.0})

    def scaled(self, factor: float) -> CombinedReward:
        """The same members with every weight multiplied by ``factor``."""
        if not isinstance(factor, (int, float)):
            return NotImplemented
        weights = {k: w * factor for k, w in self.weights.items()}
        return CombinedReward(self.members, weights, self.member_normalization)

    def plus(self, other: CombinedReward) -> CombinedReward:
        """Merge two combinations; the same module with the same normalization has its weights added (with a
        different normalization it stays a separate term)."""
        members = dict(self.members)
        weights = dict(self.weights)
        normalization = dict(self.member_normalization)
        for key, member in other.members.items():
            norm = other.member_normalization[key]
            existing = next((k for k, m in members.items() if m is member and normalization[k] == norm), None)
            if existing is not None:
                weights[existing] += other.weights[key]
                continue
            new_key = _unique_key(key, members)
            members[new_key] = member
            weights[new_key] = other.weights[key]
            normalization[new_key] = norm
        return CombinedReward(members, weights, normalization)

    def compute(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        # Each member moves the images to its own device check and dtype; no shared cast here.
        with self._autograd():
            return self.score(images, prompts)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self._mix(lambda key, member: member.compute(images, prompts))

    def compute_inputs(self, images: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        def member_inputs(key: str) -> dict[str, torch.Tensor]:
            prefix = f"{key}/"
            return {name.removeprefix(prefix): t for name, t in inputs.items() if name.startswith(prefix)}

        with self._autograd():
            return self._mix(lambda key, member: member.compute_inputs(images, member_inputs(key)))

    def prompt_processors(self) -> dict[str, PromptProcessor]:
        """The members' processors, each prefix led by the member's key: ``{"pickscore/": ...}``."""
        return {
            f"{key}/{prefix}": processor
            for key, member in self.members.items()
            for prefix, processor in member.prompt_processors().items()
        }

    def _mix(self, member_scores: Callable[[str, Reward], torch.Tensor]) -> torch.Tensor:
        """The weighted, normalised sum of ``member_scores(key, member)``; keeps the raw scores in ``last_scores``."""
        total = None
        self.last_scores = {}
        for key, member in self.members.items():
            raw = member_scores(key, member)
            self.last_scores[key] = raw.detach()
            mean, std = self.member_normalization[key]
            term = self.weights[key] * (raw - mean) / std
            total = term if total is None else total + term
        return total


def _unique_key(key: str, taken: Mapping[str, object]) -> str:
    if key not in taken:
        return key
    i = 2
    while f"{key}_{i}" in taken:
        i += 1
    return f"{key}_{i}"


def parse_reward_spec(spec: str) -> dict[str, float]:
    """Parse ``"aesthetic=0.7,brightness=0.3"`` (a bare name means weight 1) into ``{name: weight}``."""
    weights: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"bad weight {value!r} for '{name}' in reward spec {spec!r}; expected a number") from None
        if name in weights:
            raise ValueError(f"reward '{name}' appears twice in reward spec {spec!r}")
        weights[name] = weight
    if not weights:
        raise ValueError(f"empty reward spec {spec!r}; expected e.g. 'aesthetic=0.7,brightness=0.3'")
    return weights


def combine(
    spec: str | Mapping[str | Reward, float] | Sequence[tuple[str | Reward, float]],
    *,
    normalize: bool | Mapping[str, tuple[float, float]] = False,
    pretrained: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> CombinedReward:
    """Build a weighted multi-reward objective.

    ``spec`` is a string ``"aesthetic=0.7,brightness=0.3"``, a mapping or a list of ``(reward, weight)``
    pairs, where each reward is a registered name (built with ``get_reward(name, pretrained, device=...,
    dtype=...)``) or an already built :class:`Reward` (use this to pass options or weights; ``device`` and
    ``dtype`` apply only to rewards built here by name).

    ``normalize``: ``False`` for a plain weighted sum; ``True`` to standardise each member with its documented
    ``normalization`` ``(mean, std)``; or a mapping ``{member name: (mean, std)}`` overriding those defaults.
    """
    from rewards.registry import get_reward

    if isinstance(spec, str):
        pairs: list[tuple[str | Reward, float]] = list(parse_reward_spec(spec).items())
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        pairs = list(spec)
    result: CombinedReward | None = None
    for item, weight in pairs:
        reward = item if isinstance(item, Reward) else get_reward(item, pretrained, device=device, dtype=dtype)
        part = CombinedReward.of(reward).scaled(float(weight))
        result = part if result is None else result.plus(part)
    if result is None:
        raise ValueError("combine() needs at least one reward")
    if normalize is False:
        return result
    overrides = {} if normalize is True else dict(normalize)
    normalization = {}
    for key, member in result.members.items():
        normalization[key] = overrides.pop(key, member.normalization)
    if overrides:
        raise ValueError(f"normalize names {sorted(overrides)}, which are not members of {sorted(result.members)}")
    return CombinedReward(result.members, result.weights, normalization)
