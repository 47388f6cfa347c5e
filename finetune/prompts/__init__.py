"""Built-in prompt sets and prompt-file loading."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

BUILTIN = ("animals", "varied", "eval")


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with ``#`` are comments."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_prompts(spec: str | Path) -> list[str]:
    """Prompts from a built-in set name (``animals``, ``varied``, ``eval``) or a text file, one prompt a line."""
    name = str(spec)
    if name in BUILTIN:
        return parse_prompts(resources.files(__name__).joinpath(f"{name}.txt").read_text())
    path = Path(spec).expanduser()
    if not path.is_file():
        close = difflib.get_close_matches(name, BUILTIN, n=1)
        hint = f" Did you mean the built-in set '{close[0]}'?" if close else ""
        raise FileNotFoundError(
            f"prompts {name!r} is neither a built-in set ({', '.join(BUILTIN)}) nor an existing file.{hint}"
        )
    prompts = parse_prompts(path.read_text())
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one prompt per line; '#' starts a comment)")
    return prompts
