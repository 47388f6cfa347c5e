"""Reward arguments as command lines spell them, shared by ``python -m rewards`` and ``python -m finetune train``:
``--reward NAME|MIX``, ``--option KEY=VALUE`` (repeatable), ``--weights PATH | COMPONENT=PATH[,...]`` and
``--random-weights``. Parsing imports nothing heavy, so a CLI can check them before loading anything."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rewards.base import Reward


def parse_options(items: list[str]) -> dict[str, object]:
    """``--option KEY=VALUE`` (repeatable); values are read as YAML scalars (``281``, ``true``, ``cat``)."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE, e.g. --option target=cat")
        options[key] = yaml.safe_load(value)
    return options


def parse_weights(items: list[str]) -> str | dict[str, str] | None:
    """``--weights PATH`` for a single-component reward, or ``--weights COMPONENT=PATH[,COMPONENT=PATH...]``
    (repeatable) naming the components to override."""
    named: dict[str, str] = {}
    plain = []
    for item in items:
        if "=" not in item:
            plain.append(item)
            continue
        for part in item.split(","):
            component, sep, path = part.partition("=")
            if not sep or not component or not path:
                raise ValueError(f"--weights {item!r}: expected COMPONENT=PATH[,COMPONENT=PATH...], e.g. clip=DIR")
            named[component] = path
    if (named and plain) or len(plain) > 1:
        raise ValueError("--weights: give one PATH, or COMPONENT=PATH for each component to override")
    return plain[0] if plain else named or None


def build_reward_from_spec(
    spec: str,
    options: Mapping[str, Any],
    weights: str | Mapping[str, str] | None,
    pretrained: bool = True,
    device: str | None = None,
    normalize: bool = False,
) -> Reward:
    """The reward a command line asks for: one reward with its options and weights, or a weighted mix (whose
    members take no options or weights on a command line; build such mixes in Python)."""
    from rewards.combine import combine, parse_reward_spec
    from rewards.registry import get_reward

    names = parse_reward_spec(spec)
    if len(names) == 1 and next(iter(names.values())) == 1.0:
        name = next(iter(names))
        return get_reward(name, pretrained, weights=weights, device=device, **options)
    if weights is not None or options:
        raise ValueError("--weights and --option apply to a single reward; build mixes with options in Python")
    return combine(names, pretrained=pretrained, device=device, normalize=normalize)
