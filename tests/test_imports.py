"""The README's environment runs every module: each module of the packages and each benchmark script imports, and
every third-party module that any of them imports, also lazily inside a function, is declared in pyproject.toml
(at module level: a dependency or the test extra; lazily: at least some extra) or, if absent, belongs to an optional
extra. A dependency that only arrives through another package (or through an extra CI installs) fails here, not in a
user's run."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rewards", "finetune", "compose")
SOURCES = sorted(p for package in (*PACKAGES, "benchmarks") for p in (ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalise(re.split(r"[<>=!~\[; ]", r.strip(), maxsplit=1)[0]) for r in requirements}


def declared() -> tuple[set[str], set[str], set[str]]:
    """(module-level allowed, anywhere allowed, optional-extra) distribution names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    core = requirement_names(project["dependencies"]) | requirement_names(extras.get("test", []))
    optional = set().union(*(requirement_names(v) for k, v in extras.items() if k != "test"))
    return core, core | optional, optional


def third_party_imports(path: Path) -> list[tuple[str, bool]]:
    """``(top-level module, imported at module level)`` for every absolute import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    local = set(PACKAGES) | {p.stem for p in path.parent.glob("*.py")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                found.append((top, id(node) in top_level))
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports(path, monkeypatch):
    if path.parts[-2] == "benchmarks":
        monkeypatch.syspath_prepend(str(path.parent))  # as `python benchmarks/NAME.py` runs it
        spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))  # scripts guard their work with __main__
    else:
        importlib.import_module(module_name(path))


def test_every_third_party_import_is_declared():
    core, anywhere, optional = declared()
    distributions = importlib.metadata.packages_distributions()
    problems = set()
    for path in SOURCES:
        for module, at_module_level in third_party_imports(path):
            where = f"{path.relative_to(ROOT)} imports {module}"
            owners = {normalise(d) for d in distributions.get(module, [])}
            if not owners:
                if normalise(module) not in optional:
                    problems.add(f"{where}: not installed by the README's install and not in an optional extra")
                continue
            allowed = core if at_module_level else anywhere
            if not owners & allowed:
                level = "at module level" if at_module_level else "lazily"
                problems.add(f"{where} {level}, but none of {sorted(owners)} is declared for that in pyproject.toml")
    assert not problems, "\n".join(sorted(problems))


def test_the_check_sees_lazy_and_undeclared_imports(tmp_path):
    """The scanner finds imports inside functions and tells them from module-level ones."""
    source = tmp_path / "probe.py"
    source.write_text("import numpy\n\ndef plot():\n    import matplotlib.pyplot as plt\n    from os import path\n")
    assert third_party_imports(source) == [("numpy", True), ("matplotlib", False)]


@pytest.mark.parametrize("cli", ["finetune", "rewards", "compose"])
def test_cli_help_imports_nothing_heavy(cli):
    """``python -m CLI --help`` answers without loading torch or the model libraries (about 0.2 s, not seconds)."""
    probe = (
        f"import runpy, sys; sys.argv = ['{cli}', '--help']\n"
        f"try:\n    runpy.run_module('{cli}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'open_clip') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert "usage: python -m" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
