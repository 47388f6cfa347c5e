"""The reward zoo's registry, in the style of timm: ``@register_reward``, ``get_reward``, ``list_rewards``."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from rewards import hints
from rewards.base import Reward
from rewards.weights import MAIN, MissingWeightsError, WeightsArg, WeightSource, missing_weights_message

Builder = Callable[..., Reward]


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward: its builder, the names of its weight components and a one-line description."""

    name: str
    builder: Builder
    components: tuple[str, ...]
    description: str
    requires: tuple[str, ...] = ()
    """Optional packages the reward needs (installed by an extra, e.g. ``ultralytics`` for ``yolo``)."""
    sources: Mapping[str, WeightSource] = field(default_factory=dict)
    """The reference source of each component, for rewards with several: a missing download then names them all."""
    differentiable: bool = True
    """Whether the rewards it builds carry a gradient to the images (known before building one, so that a command
    line can refuse a reward that its method cannot use before loading anything)."""

    @property
    def missing_packages(self) -> tuple[str, ...]:
        return tuple(m for m in self.requires if importlib.util.find_spec(m) is None)

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword options the builder accepts besides ``pretrained`` and ``weights``."""
        params = inspect.signature(self.builder).parameters
        return tuple(p for p in params if p not in ("pretrained", "weights"))


_REGISTRY: dict[str, RewardEntry] = {}
BUILTIN_MEMBERS = (
    "aesthetic",
    "hps",
    "imagereward",
    "jpeg",
    "owlvit",
    "pickscore",
    "resnet",
    "shapes.classifier",
    "shapes.geometry",
    "shapes.judge",
    "simple",
    "yolo",
)
"""The modules of ``rewards`` that register the built-in rewards, imported on the registry's first query."""
_builtins_loaded = False


def _load_builtin_members() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # first: the members import this module
        for module in BUILTIN_MEMBERS:
            importlib.import_module(f"rewards.{module}")


def register_reward(
    name: str,
    components: tuple[str, ...] = (),
    requires: tuple[str, ...] = (),
    sources: Mapping[str, WeightSource] | None = None,
    differentiable: bool = True,
) -> Callable[[Builder], Builder]:
    """Register a builder ``fn(pretrained: bool, weights: dict[str, path or hub id], **options) -> Reward``.

    ``components`` names the parts that have weights (e.g. ``("clip", "head")``); a reward with one part uses
    ``("main",)`` and accepts ``weights=PATH``; a weight-free reward uses ``()``. ``requires`` names optional
    packages the builder imports. ``sources`` gives the reference :class:`WeightSource` of each component of a
    reward with several, so that a failed download names every file the reward needs. ``differentiable=False``
    declares that the rewards built carry no gradient (their ``differentiable`` attribute, checked on each build).
    The builder's docstring's first line is the description shown by ``python -m rewards list``.
    """
    if sources and not set(sources) <= set(components):
        raise ValueError(f"sources name components {sorted(set(sources) - set(components))} not in {components}")

    def decorator(builder: Builder) -> Builder:
        _load_builtin_members()  # a custom reward cannot silently take a built-in's name
        if name in _REGISTRY:
            raise ValueError(f"reward '{name}' is already registered")
        doc = inspect.getdoc(builder) or ""
        description = doc.splitlines()[0] if doc else ""
        _REGISTRY[name] = RewardEntry(
            name, builder, tuple(components), description, tuple(requires), dict(sources or {}), differentiable
        )
        return builder

    return decorator


def list_rewards(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered rewards, optionally filtered by a glob ``pattern`` (e.g. ``"aesthetic*"``)."""
    _load_builtin_members()
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def get_entry(name: str) -> RewardEntry:
    """The registry entry for ``name``; an unknown name raises ``ValueError`` listing close matches."""
    _load_builtin_members()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown reward '{name}'.{hint} Available: {', '.join(list_rewards())} (see {hints.list_command()})."
        ) from None


def get_reward(
    name: str,
    pretrained: bool = True,
    weights: WeightsArg | Mapping[str, WeightsArg] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: object,
) -> Reward:
    """Build a registered reward.

    Args:
        name: a name from :func:`list_rewards`.
        pretrained: load the reference weights (from the Hugging Face cache or hub). ``False`` builds the same
            architecture with random weights, except the components given in ``weights``.
        weights: a local file, a local directory in the reference layout, or a hub id; for a reward with several
            components a dict such as ``{"clip": ..., "head": ...}`` naming the ones to override.
        device, dtype: where and in which precision to put the reward.
        options: reward-specific options (e.g. ``target=`` for ``resnet50``, ``tiny=True`` for a small test
            backbone); an unknown option raises ``ValueError`` listing the accepted ones.
    """
    entry = get_entry(name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        accepted = ", ".join(entry.options) or "none"
        raise ValueError(f"reward '{name}' got unknown option(s) {', '.join(unknown)}; accepted options: {accepted}")
    given = _component_weights(entry, weights)
    try:
        reward = entry.builder(pretrained=pretrained, weights=given, **options)
    except MissingWeightsError as err:  # name every file of a reward with several components
        if err.source is None or err.component not in entry.sources or len(entry.sources) < 2:
            raise
        message = missing_weights_message(name, err.component, err.source, err.reason or "", entry.sources, given)
        raise MissingWeightsError(
            message, reward=name, component=err.component, source=err.source, reason=err.reason
        ) from err.__cause__
    if reward.differentiable != entry.differentiable:
        raise RuntimeError(
            f"reward '{name}' is registered with differentiable={entry.differentiable} but its builder returned a "
            f"reward with differentiable={reward.differentiable}; make them agree (register_reward(..., "
            f"differentiable=...) or the reward's differentiable attribute)"
        )
    reward.name = entry.name
    reward.freeze()
    if device is not None or dtype is not None:
        reward.to(device=device, dtype=dtype)
    return reward


def _component_weights(
    entry: RewardEntry, weights: WeightsArg | Mapping[str, WeightsArg] | None
) -> dict[str, WeightsArg]:
    if weights is None:
        return {}
    if not entry.components:
        raise ValueError(f"reward '{entry.name}' has no weights; do not pass {hints.flag('weights')}")
    if not isinstance(weights, Mapping):
        if entry.components != (MAIN,):
            example = hints.weights({component: "PATH" for component in entry.components})
            raise ValueError(
                f"reward '{entry.name}' has several weight components ({', '.join(entry.components)}); name the "
                f"ones to override, e.g. {example}"
            )
        return {MAIN: weights}
    unknown = sorted(set(weights) - set(entry.components))
    if unknown:
        raise ValueError(
            f"reward '{entry.name}' has no weight component(s) {', '.join(unknown)}; its components are "
            f"{', '.join(entry.components)}"
        )
    return dict(weights)
