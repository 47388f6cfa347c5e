"""The embedded shapes world (scenes, captions) and its classifier reward ``shapes`` with the shipped weights."""

import random

import pytest
import torch
from safetensors.torch import save_file

from rewards import MissingWeightsError, WeightsMismatchError, get_reward
from rewards.shapes import ShapesClassifier, all_captions, parse_caption, render, sample_batch
from rewards.shapes.classifier import WEIGHTS_FILE, prompt_agreement
from rewards.shapes.world import COLORS, SHAPES, caption, radius, sample_scene


def test_captions_round_trip():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 36
    for text in captions:
        count, color, shape = parse_caption(text)
        assert caption(count, color, shape) == text
    assert parse_caption("a red circle") == (1, "red", "circle")
    assert parse_caption("  Three BLUE triangles ") == (3, "blue", "triangle")


@pytest.mark.parametrize("text", ["two purple circles", "four red squares", "a photo of a cat", ""])
def test_bad_caption_names_the_grammar(text):
    with pytest.raises(ValueError, match="<count> <color> <shape>"):
        parse_caption(text)


def test_scenes_are_seeded_and_follow_their_caption():
    a = sample_batch(16, random.Random(3))
    b = sample_batch(16, random.Random(3))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.images.shape == (16, 3, 32, 32) and a.images.min() >= 0 and a.images.max() <= 1
    for seed in range(50):
        scene = sample_scene(random.Random(seed), count=3, color="yellow", shape="triangle")
        assert scene.caption == "three yellow triangles" and len(scene.centers) == 3
        # Shapes do not overlap and stay inside the image: the coloured area is count x one shape's area.
        image = render(scene, 128)
        coloured = (image - torch.tensor(COLORS["yellow"]).view(3, 1, 1)).abs().amax(0) < 0.02
        r = radius(scene.size) * 128
        area = torch.pi * r**2  # every kind has the circle's area
        assert coloured.sum().item() == pytest.approx(3 * area, rel=0.12)


def test_shipped_classifier_reads_rendered_scenes():
    reward = get_reward("shapes", objective="prompt")
    batch = sample_batch(300, random.Random(2024), empty_fraction=0.1)
    with torch.no_grad():
        prediction = reward.classifier(batch.images)
    count, color, shape = prediction.labels()
    present = batch.count > 0
    assert (count == batch.count).float().mean() > 0.97
    assert (color == batch.color)[present].float().mean() > 0.97
    assert (shape == batch.shape)[present].float().mean() > 0.97
    assert (prediction.size - batch.size)[present].abs().mean() < 0.06
    assert prompt_agreement(prediction, batch.captions)[present].mean() > 0.95


def test_objectives_rank_scenes_as_they_should():
    rng = random.Random(7)
    small = render(sample_scene(rng, 2, "red", "circle"))
    scenes = {
        n: torch.stack([render(sample_scene(random.Random(i), n, "blue", "square")) for i in range(8)]) for n in (1, 3)
    }
    add, remove = get_reward("shapes", objective="count"), get_reward("shapes", objective="count", mode="remove")
    assert add(scenes[3]).mean() > add(scenes[1]).mean() + 1.5
    assert torch.allclose(remove(scenes[1]), -add(scenes[1]))
    prompt = get_reward("shapes", objective="prompt")
    assert prompt(small[None], "two red circles") > prompt(small[None], "two green circles") + 3
    red = get_reward("shapes", objective="color", target="red")
    assert red(small[None]) > -0.1
    assert get_reward("shapes", objective="shape", target="circle")(small[None]) > -0.1


def test_size_objective_follows_size():
    def scene(size: float) -> torch.Tensor:
        base = sample_scene(random.Random(1), 1, "green", "circle")
        return render(type(base)(1, "green", "circle", size, 0.3, ((0.5, 0.5),)))

    images = torch.stack([scene(s) for s in (0.1, 0.5, 0.9)])
    grow, shrink = get_reward("shapes", objective="size"), get_reward("shapes", objective="size", mode="shrink")
    scores = grow(images)
    assert scores[0] < scores[1] < scores[2]
    assert torch.allclose(shrink(images), -scores)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs objective="),
        ({"objective": "colour"}, "needs objective="),
        ({"objective": "color"}, "target= one of"),
        ({"objective": "shape", "target": "hexagon"}, "target= one of"),
        ({"objective": "count", "target": "red"}, "takes no target"),
        ({"objective": "count", "mode": "grow"}, "mode= one of"),
        ({"objective": "prompt", "mode": "add"}, "mode= one of"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        get_reward("shapes", **options)


def test_prompt_objective_needs_world_captions():
    reward = get_reward("shapes", objective="prompt")
    with pytest.raises(ValueError, match="prompt"):
        reward(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        reward(torch.rand(1, 3, 32, 32), "a photo of a cat")


def test_any_resolution_and_gradient():
    reward = get_reward("shapes", objective="size")
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    reward(images).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_weights_override_strict(tmp_path):
    model = ShapesClassifier()
    path = tmp_path / "classifier.safetensors"
    save_file(model.state_dict(), str(path))
    reward = get_reward("shapes", pretrained=False, weights=str(path), objective="count")
    for key, value in model.state_dict().items():
        assert torch.equal(reward.classifier.state_dict()[key], value)
    state = model.state_dict()
    state.pop("size.bias")
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"size\.bias"):
        get_reward("shapes", weights=str(tmp_path / "partial.safetensors"), objective="count")
    with pytest.raises(MissingWeightsError):
        get_reward("shapes", weights=str(tmp_path / "absent.safetensors"), objective="count")


def test_shipped_weights_are_small():
    assert WEIGHTS_FILE.stat().st_size < 2_000_000


def test_match_is_one_exactly_when_the_reading_is_the_caption():
    """``shapes-match`` against the classifier's own labels compared with the caption by hand."""
    batch = sample_batch(12, random.Random(5))
    match = get_reward("shapes-match")
    wrong_count = [caption(n % 3 + 1, c, s) for n, c, s in (parse_caption(t) for t in batch.captions)]
    wrong_color = [t.replace(t.split()[1], "green" if t.split()[1] != "green" else "red") for t in batch.captions]
    images = batch.images.requires_grad_(True)
    with torch.no_grad():
        count, color, shape = match.classifier(batch.images).labels()
    colors, kinds = [list(COLORS)[k] for k in color.tolist()], [SHAPES[k] for k in shape.tolist()]
    readings = list(zip(count.tolist(), colors, kinds, strict=True))
    for captions in (batch.captions, wrong_count, wrong_color):
        expected = torch.tensor([float(r == parse_caption(t)) for r, t in zip(readings, captions, strict=True)])
        scores = match(images, captions)
        assert not scores.requires_grad and torch.equal(scores, expected)
    assert match(images, batch.captions).mean() > 0.9 and match(images, wrong_count).sum() == 0
    assert not match.differentiable and match.needs_prompts
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        match(images, "a photo of a cat")
    with pytest.raises(ValueError, match=r"'shapes-match' got unknown option\(s\) objective"):
        get_reward("shapes-match", objective="prompt")
