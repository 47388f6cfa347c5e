"""Where a benchmark ran: the commit (and whether the tree had uncommitted changes), the library versions, the
machine and its load, printed as the first and last lines of every benchmark's output so that a recorded
result says what code produced it and how busy the machine was."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
"""Recorded results: a run writing its own result file does not make the code it measured dirty."""


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    return result.stdout if result.returncode == 0 else ""


def commit() -> str:
    """The short commit of the checkout, with the changed files (outside ``benchmarks/results``) if it is dirty,
    or ``unknown (not a git checkout)``."""
    head = git("rev-parse", "--short", "HEAD").strip()
    if not head:
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in git("status", "--porcelain", "--", ".", f":!{RESULTS}").splitlines()]
    return f"{head} + uncommitted changes to {', '.join(changed)}" if changed else f"{head} (clean)"


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"


def header() -> str:
    """One line: commit, versions, machine, load average now (other processes share the CPUs)."""
    import diffusers

    return (
        f"commit {commit()}; torch {torch.__version__}, diffusers {diffusers.__version__}, Python "
        f"{platform.python_version()}; {platform.machine()}, {os.cpu_count()} CPUs; load average (1 min) at start "
        f"{load_average()}"
    )


def footer() -> str:
    return f"load average (1 min) at end {load_average()}"
