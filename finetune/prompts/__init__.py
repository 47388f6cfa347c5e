"""Built-in prompt sets and prompt-file loading."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

BUILTIN = ("animals", "varied", "eval")
WORLD = ("world", "world-held-out")
"""The embedded shapes world's captions, split into fine-tuning and held-out prompts."""


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with ``#`` are comments."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_prompts(spec: str | Path) -> list[str]:
    """Prompts from a built-in set name (``animals``, ``varied``, ``eval``; ``world`` and ``world-held-out`` for the
    embedded world) or a text file, one prompt a line."""
    name = str(spec)
    if name in BUILTIN:
        return parse_prompts(resources.files(__name__).joinpath(f"{name}.txt").read_text())
    if name in WORLD:
        from finetune.world import split_prompts

        return split_prompts()[WORLD.index(name)]
    path = Path(spec).expanduser()
    if not path.is_file():
        close = difflib.get_close_matches(name, BUILTIN + WORLD, n=1)
        hint = f" Did you mean the built-in set '{close[0]}'?" if close else ""
        raise FileNotFoundError(
            f"prompts {name!r} is neither a built-in set ({', '.join(BUILTIN + WORLD)}) nor an existing file.{hint}"
        )
    prompts = parse_prompts(path.read_text())
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one prompt per line; '#' starts a comment)")
    return prompts
