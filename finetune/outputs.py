"""The output directory of a run: never mix two runs' files. Imports nothing heavy, so the CLI checks it before
loading anything."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path


def check_output_dir(path: Path, resume: bool, overwrite: bool, what: str = "run") -> None:
    """Refuse a non-empty ``path`` unless ``resume`` (a training run continues there) or ``overwrite``, so that two
    runs' files never mix. Changes nothing, so it can run before anything is loaded. ``what`` names the kind of
    run (only a training ``"run"`` can be resumed)."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output directory and --overwrite deletes it: give one")
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if held and not (resume or overwrite):
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        resume_hint = "--resume to continue the run it holds, " if what == "run" else ""
        raise FileExistsError(
            f"output directory {path} is not empty ({shown}). Pass {resume_hint}--overwrite to replace the {what} "
            f"it holds, or choose another --output-dir."
        )


def claim_output_dir(path: Path, artefacts: Sequence[str], resume: bool, overwrite: bool, what: str = "run") -> None:
    """:func:`check_output_dir`, then, with ``overwrite``, delete the previous run's ``artefacts`` (names inside
    ``path``) and nothing else the directory holds."""
    check_output_dir(path, resume, overwrite, what)
    if overwrite:
        for name in artefacts:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
