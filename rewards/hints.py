"""How error messages spell a reward's arguments: in Python (``get_reward('owlvit', query='cat')``) or, inside a
command line tool, as its flags (``--option query=cat``). Every hint is written through these functions, so both
spellings live in one place; a CLI runs its work inside :func:`command_line` (this module imports nothing heavy)."""

from __future__ import annotations

import contextvars
import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

_COMMAND_LINE = contextvars.ContextVar("rewards_command_line_hints", default=False)


@contextmanager
def command_line() -> Iterator[None]:
    """Within this block, hints are spelled as the command line flags of ``python -m rewards`` and
    ``python -m finetune`` (``--option``, ``--weights``, ``--random-weights``)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def on_command_line() -> bool:
    return _COMMAND_LINE.get()


def options(**values: object) -> str:
    """``query='cat', mode='add'`` or ``--option query=cat --option mode=add``."""
    if on_command_line():
        return " ".join(f"--option {shlex.quote(f'{key}={value}')}" for key, value in values.items())
    return ", ".join(f"{key}={value!r}" for key, value in values.items())


def weights(value: str | Mapping[str, str]) -> str:
    """A path for a single-component reward, or a path per component: ``weights='DIR'`` or
    ``weights={'clip': 'DIR', 'head': 'FILE'}``; ``--weights DIR`` or ``--weights clip=DIR,head=FILE``."""
    if on_command_line():
        text = value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in value.items())
        return f"--weights {shlex.quote(text)}"
    return f"weights={value!r}" if isinstance(value, str) else f"weights={dict(value)!r}"


def flag(name: str) -> str:
    """An argument of ``get_reward`` by itself: ``weights=`` or ``--weights``."""
    return f"--{name.replace('_', '-')}" if on_command_line() else f"{name}="


def option(name: str) -> str:
    """A reward option by itself, before its value: ``objective=`` or ``--option objective=``."""
    return f"--option {name}=" if on_command_line() else f"{name}="


def random_weights() -> str:
    """``pretrained=False`` or ``--random-weights``."""
    return "--random-weights" if on_command_line() else "pretrained=False"


def usage(reward: str, *arguments: str) -> str:
    """A call with the given hints: ``get_reward('owlvit', query='cat')``, or the flags alone on the command line
    (``--option query=cat``), where the reward is already named."""
    if on_command_line():
        return " ".join(a for a in arguments if a != "...")
    return f"get_reward({', '.join([repr(reward), *arguments])})"


def list_command() -> str:
    """Where the registered rewards are listed."""
    return "python -m rewards list" if on_command_line() else "list_rewards()"
