"""Every registered reward has a model card with front matter, the required sections and the code's numbers."""

from pathlib import Path

import pytest
import yaml

from rewards import get_reward, list_rewards
from rewards.registry import get_entry
from tests.rewards.test_interface import REQUIRED_OPTIONS

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
SECTIONS = [
    "## What it rewards",
    "## Inputs and preprocessing",
    "## Output and typical range",
    "## Weights",
    "## Known reward hacking",
    "## Citation",
]


@pytest.mark.parametrize("name", list_rewards())
def test_card(name):
    path = CARDS / f"{name}.md"
    assert path.exists(), f"model_cards/{name}.md is missing"
    text = path.read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert {"license", "source", "tags"} <= set(front)
    assert "reward" in front["tags"]
    kind = "differentiable" if get_entry(name).differentiable else "non-differentiable"
    assert kind in front["tags"] and {"differentiable", "non-differentiable"} & set(front["tags"]) == {kind}
    positions = [text.find(s) for s in SECTIONS]
    assert all(p > 0 for p in positions), f"missing sections in {path.name}"
    assert positions == sorted(positions), f"sections out of order in {path.name}"

    if get_entry(name).missing_packages:
        pytest.skip(f"{name} needs {', '.join(get_entry(name).missing_packages)} to check its numbers")
    options = dict(REQUIRED_OPTIONS.get(name, {}))
    if "tiny" in get_entry(name).options:
        options["tiny"] = True
    reward = get_reward(name, pretrained=False, **options)
    lo, hi = reward.typical_range
    assert f"Typical range: {lo:g} to {hi:g}" in text
    mean, std = reward.normalization
    assert f"mean {mean:g}, std {std:g}" in text


def test_no_orphan_cards():
    assert {p.stem for p in CARDS.glob("*.md")} <= set(list_rewards())
