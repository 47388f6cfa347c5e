"""The shapes world's independent judges: the ``shapes-judge`` network (shipped weights, independence from the
``shapes`` classifier) and the learning-free ``shapes-geometry`` measurement (exact on clean renders)."""

import fnmatch
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.__main__ import check_reward_arguments
from finetune.config import DRAFT_METHOD_NAMES, TrainConfig
from finetune.guards import WORLD_JUDGES, build_judges
from finetune.world.classifier import CLASSIFIER, JUDGE
from rewards import get_reward
from rewards.__main__ import main
from rewards.shapes import ShapesClassifier, ShapesJudge, measure, render, sample_batch
from rewards.shapes.geometry import FOREGROUND_DISTANCE
from rewards.shapes.judge import JUDGE_WEIGHTS_FILE
from rewards.shapes.world import BACKGROUND_RANGE, COLORS, SHAPES, Scene, caption, radius, sample_scene

JUDGE_FLOOR = 0.97
"""Least share of fresh scenes (count, colour and kind all right) the shipped judge must read; it read 100% of
1,000 held-out scenes of its own stream, clean and degraded (judge.provenance.json)."""


@pytest.fixture(scope="module")
def fresh():
    """300 scenes from a stream that neither the classifier nor the judge trained or was tested on, 10% empty."""
    return sample_batch(300, random.Random("tests/shapes-judge"), empty_fraction=0.1)


def test_shipped_judge_loads_strictly_and_reads_fresh_scenes(fresh):
    state = load_file(str(JUDGE_WEIGHTS_FILE))
    assert state.keys() == ShapesJudge().state_dict().keys()
    assert JUDGE_WEIGHTS_FILE.stat().st_size < 2_000_000
    judge = get_reward("shapes-judge", objective="size").classifier
    for key, value in state.items():
        assert torch.equal(judge.state_dict()[key], value)
    with torch.no_grad():
        prediction = judge(fresh.images)
    count, color, shape = prediction.labels()
    present = fresh.count > 0
    exact = (count == fresh.count) & (~present | ((color == fresh.color) & (shape == fresh.shape)))
    assert exact.float().mean() >= JUDGE_FLOOR
    assert (prediction.size - fresh.size)[present].abs().mean() < 0.06
    record = json.loads(JUDGE_WEIGHTS_FILE.with_name("judge.provenance.json").read_text())
    assert record["command"].startswith("python -m finetune.world.train judge") and record["seed"] == JUDGE.seed


def test_judge_is_independent_of_the_classifier():
    """Another architecture (no parameter shape in common; max pooling and a flattened-map head, BatchNorm and
    ReLU, where the classifier has strided convolutions, global average pooling, GroupNorm and SiLU), another seed,
    other scene streams."""
    classifier, judge = ShapesClassifier(), ShapesJudge()
    shapes = {tuple(p.shape) for p in classifier.parameters()}
    assert not shapes & {tuple(p.shape) for p in judge.parameters()}
    nn = torch.nn
    judge_kinds, classifier_kinds = {type(m) for m in judge.modules()}, {type(m) for m in classifier.modules()}
    assert {nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten} <= judge_kinds
    assert not judge_kinds & {nn.GroupNorm, nn.SiLU} and not classifier_kinds & {nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU}
    assert all(m.stride == (1, 1) for m in judge.modules() if isinstance(m, nn.Conv2d))
    assert JUDGE.seed != CLASSIFIER.seed and JUDGE.model is ShapesJudge and CLASSIFIER.model is ShapesClassifier


def test_scene_streams_are_disjoint():
    """No scene among the first thousands of the judge's training and held-out streams is one of the classifier's."""

    def scenes(rng, n=3000):
        return {sample_scene(rng) for _ in range(n)}

    classifier = scenes(CLASSIFIER.scenes(0, "train")) | scenes(CLASSIFIER.scenes(0, "held-out"))
    judge = scenes(JUDGE.scenes(JUDGE.seed, "train")) | scenes(JUDGE.scenes(JUDGE.seed, "held-out"))
    assert len(classifier) == len(judge) == 6000 and not classifier & judge
    assert not judge & scenes(JUDGE.scenes(CLASSIFIER.seed, "train"))  # the string streams differ with the seed


def test_judge_rewards_share_the_objectives():
    batch = sample_batch(24, random.Random("tests/judge-objectives"))
    match, prompt = get_reward("shapes-judge-match"), get_reward("shapes-judge", objective="prompt")
    wrong = [caption(n % 3 + 1, c, s) for n, c, s in zip(batch.count.tolist(), [list(COLORS)[i] for i in
             batch.color.tolist()], [SHAPES[i] for i in batch.shape.tolist()], strict=True)]  # fmt: skip
    assert match(batch.images, batch.captions).mean() > 0.9 and match(batch.images, wrong).sum() == 0
    assert (prompt(batch.images, batch.captions) > prompt(batch.images, wrong)).all()
    assert not match.differentiable and get_reward("shapes-judge", objective="count").differentiable
    with pytest.raises(ValueError, match="shapes-judge needs objective="):
        get_reward("shapes-judge")


def scene(count, color, shape, size, background, centers):
    return Scene(count, color, shape, size, background, tuple(centers))


SIZE_TOLERANCE = {32: 0.05, 128: 0.012}
"""Largest error of the measured size on clean renders, by render resolution (in the world's normalised size, 0
to 1). The renderer's coverage comes from 4x4 supersamples, in steps of 1/16 that err alike along a straight
edge: an axis-aligned square's area is off by up to about 2 pixels at 32 px (measured worst of 1,000 scenes:
0.042; circles 0.009, triangles 0.018); rendered at 128 px and box-filtered to 32 px, 16x16 supersamples
(measured worst 0.0093)."""


@pytest.mark.parametrize("resolution", [32, 128])
def test_geometry_is_exact_on_clean_renders(resolution):
    """Colour and background exact, kind exact and size within :data:`SIZE_TOLERANCE` where the count is, on 400
    random scenes (10% empty) rendered at 32 px and at 128 px (box-filtered to 32 px inside). The count is exact but
    where triangles touch: the world places shapes more than 2.6 radii apart, and two upright triangles side by
    side need their side, 2.69 radii, not to touch, so they can form one component (here 1 scene of 400 at 32 px,
    6 at 128 px)."""
    rng = random.Random(f"tests/geometry/{resolution}")
    scenes = [sample_scene(rng, count=0 if rng.random() < 0.1 else None) for _ in range(400)]
    images = torch.stack([render(s, resolution) for s in scenes])
    measured = measure(images)
    counts = torch.tensor([s.count for s in scenes])
    merged = (measured.count != counts).nonzero()[:, 0].tolist()
    assert len(merged) <= 8
    for i in merged:
        gap = min(math.dist(a, b) for j, a in enumerate(scenes[i].centers) for b in scenes[i].centers[j + 1 :])
        assert scenes[i].shape == "triangle" and 0 < measured.count[i] < scenes[i].count
        assert gap < 2.7 * radius(scenes[i].size)
    present = counts > 0
    counted = present & (measured.count == counts)  # the kind and size of two merged triangles are another's
    assert measured.color[present].tolist() == [list(COLORS).index(s.color) for s in scenes if s.count]
    kinds = [SHAPES.index(s.shape) for s, c in zip(scenes, counted, strict=True) if c]
    assert measured.shape[counted].tolist() == kinds
    assert (measured.color[~present] == -1).all() and (measured.shape[~present] == -1).all()
    sizes = torch.tensor([s.size for s in scenes])
    assert (measured.size - sizes)[counted].abs().max() < SIZE_TOLERANCE[resolution]
    assert torch.allclose(measured.background, torch.tensor([s.background for s in scenes]), atol=1e-5)


def test_geometry_threshold_suits_every_world_colour_and_background():
    greys = torch.linspace(*BACKGROUND_RANGE, 41)
    least = min((torch.tensor(c) - g).norm().item() for c in COLORS.values() for g in greys)
    assert least / 3 > FOREGROUND_DISTANCE


def test_geometry_objectives():
    rng = random.Random(11)
    images = torch.stack(
        [render(scene(2, "blue", "triangle", s, 0.3, [(0.3, 0.3), (0.7, 0.7)])) for s in (0.1, 0.5, 0.8)]
    )
    size = get_reward("shapes-geometry")
    assert size.objective == "size"
    assert torch.allclose(size(images), torch.tensor([0.1, 0.5, 0.8]), atol=SIZE_TOLERANCE[32])
    assert get_reward("shapes-geometry", objective="count")(images).tolist() == [2.0] * 3
    assert torch.allclose(get_reward("shapes-geometry", objective="background")(images), torch.tensor(0.3))
    match = get_reward("shapes-geometry", objective="match")
    captions = ["two blue triangles", "three blue triangles", "two red triangles"]
    assert match(images, captions).tolist() == [1.0, 0.0, 0.0]
    assert match(images, "two blue squares").tolist() == [0.0] * 3
    empty = render(sample_scene(rng, count=0))[None]
    assert size(empty).item() < get_reward("shapes-geometry")(images).min().item() - 1
    with pytest.raises(ValueError, match="shapes-geometry takes objective= one of"):
        get_reward("shapes-geometry", objective="color")


@pytest.mark.parametrize("name", ["shapes-judge-match", "shapes-geometry"])
def test_non_differentiable_judges_are_refused_by_draft(name):
    for method in DRAFT_METHOD_NAMES:
        with pytest.raises(ValueError, match=rf"reward '{name}' is not differentiable.*--method ddpo"):
            check_reward_arguments(TrainConfig(method=method, reward=name))
    check_reward_arguments(TrainConfig(method="ddpo", reward=name))


def test_world_judges_are_the_independent_ones(fresh):
    """The world's default judges build from their specs and read rendered scenes as their captions say."""
    assert "shapes-match" not in WORLD_JUDGES
    judges = build_judges(WORLD_JUDGES)
    present = fresh.count > 0
    images, captions = fresh.images[present], [c for c, p in zip(fresh.captions, present, strict=True) if p]
    assert judges["shapes-judge-match"](images, captions).mean() >= JUDGE_FLOOR
    assert (judges["shapes-geometry"](images) - fresh.size[present]).abs().max() < SIZE_TOLERANCE[32]


def test_list_shows_them(capsys):
    assert main(["list", "shapes*"]) == 0
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert lines == {
        "shapes": "differentiable",
        "shapes-geometry": "non-differentiable",
        "shapes-judge": "differentiable",
        "shapes-judge-match": "non-differentiable",
        "shapes-match": "non-differentiable",
    }


def test_judge_training_cli_records_provenance(tmp_path):
    """``python -m finetune.world.train judge`` (two steps here) writes strict-loading weights and their record
    with the judge's own seed."""
    from finetune.world.train import main as train

    output = tmp_path / "judge.safetensors"
    assert train(["judge", "--steps", "2", "--output", str(output)]) == 0
    assert load_file(str(output)).keys() == ShapesJudge().state_dict().keys()
    get_reward("shapes-judge", weights=str(output), objective="size")
    record = json.loads((tmp_path / "judge.provenance.json").read_text())
    assert record["command"] == f"python -m finetune.world.train judge --steps 2 --output {output}"
    assert record["seed"] == JUDGE.seed == 1 and 0 <= record["held_out_accuracy"] <= 1


def test_package_data_ships_the_judge():
    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
    config = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["rewards"]
    for name in ("judge.safetensors", "judge.provenance.json"):
        assert (JUDGE_WEIGHTS_FILE.parent / name).is_file()
        assert any(fnmatch.fnmatch(f"shapes/{name}", pattern) for pattern in patterns)
