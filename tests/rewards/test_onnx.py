"""ONNX export (``rewards.onnx``) checked against the torch rewards; ``python -m rewards score --backend onnx``
and ``python -m rewards export``."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards.onnx
from rewards import Reward, combine, get_reward, list_rewards
from rewards.__main__ import main
from rewards.onnx import OnnxExportError, OnnxReward, export_onnx
from rewards.registry import get_entry
from rewards.shapes import sample_batch
from rewards.text import processor_from_json, processor_to_json, prompt_tensors

ROOT = Path(__file__).resolve().parents[2]
EXPORTABLE = {
    "aesthetic": {"tiny": True},
    "aesthetic-v1": {"tiny": True},
    "brightness": {},
    "contrast": {},
    "owlvit": {"tiny": True, "query": "a cat"},
    "owlvit-count": {"tiny": True, "query": "a cat"},
    "resnet50": {"target": "cat"},
    "saturation": {},
    "shapes": {"objective": "size"},
    "shapes-judge": {"objective": "size"},
    "target-color": {"color": "orange"},
    "yolo": {"target": "person"},
}
"""One build of each reward that scores images alone."""
PROMPTED = {
    "hpsv2": {"tiny": True},
    "hpsv2.1": {"tiny": True},
    "imagereward": {"tiny": True},
    "pickscore": {"tiny": True},
    "shapes": {"objective": "prompt"},
    "shapes-judge": {"objective": "prompt"},
}
"""One build of each reward that reads prompts."""
UNEXPORTABLE = {
    "jpeg-compressibility": "encodes images with PIL",
    "jpeg-incompressibility": "encodes images with PIL",
    "shapes-geometry": "labels connected components in a loop",
    "yolo-count": "non-maximum suppression, whose output size depends on the data",
}
"""Rewards whose scoring leaves torch's graph, and the reason their export error gives."""
SEPARATE = {"shapes-match", "shapes-judge-match"}
"""Rewards with an export test of their own below."""
PROMPTS = [
    "a photo of a cat",
    "an oil painting of a red car",
    "dog",
    "a watercolor of a mountain village at dawn, " * 12,  # truncated
    "It\u2019s a caf\u00e9 &amp; a dog",  # open_clip's cleaning (curly quote, entity) and accents
]
CAPTIONS = ["two red circles", "one blue square", "three green triangles", "a yellow circle", "two blue triangles"]


def varied(n, height, width):
    """``n`` images unlike each other (noise, colour ramps, blocks), so that every reward scores them apart."""
    noise = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    ramp = torch.linspace(0, 1, width).expand(1, 3, height, width) * torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)
    blocks = torch.zeros(1, 3, height, width)
    blocks[:, 2, :, : width // 2] = 1.0
    blocks[:, 0, :, width // 2 :] = 0.8
    kinds = torch.cat([noise, ramp, blocks, 0.3 * noise + 0.7, ramp.flip(-1), blocks.roll(height // 3, -2)])
    return kinds[torch.arange(n) % len(kinds)]


def tolerance(expected, rel=1e-5):
    """``rel`` of the score scale. 1e-5 covers float32 sums reassociated by onnxruntime's kernels on small images
    (measured: 1e-7 to 4e-6)."""
    return rel * max(1.0, expected.abs().max().item())


def assert_matches(got, expected, rel=1e-5):
    """Equal within :func:`tolerance`, and the expected scores spread well beyond it, so that a graph that
    ignored its input would fail."""
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= tolerance(expected, rel)
    assert (expected.max() - expected.min()).item() > 10 * tolerance(expected, rel)


def test_every_registered_reward_is_tested():
    assert sorted(list_rewards()) == sorted(set(EXPORTABLE) | set(PROMPTED) | set(UNEXPORTABLE) | SEPARATE)


@pytest.mark.parametrize("name", sorted(UNEXPORTABLE))
def test_rewards_outside_torch_say_they_have_no_graph(name, tmp_path):
    if get_entry(name).missing_packages:
        pytest.skip(f"needs {', '.join(get_entry(name).missing_packages)} (optional extra)")
    with pytest.raises(OnnxExportError, match=rf"cannot export reward '{name}'.*{UNEXPORTABLE[name]}"):
        export_onnx(get_reward(name, pretrained=False), tmp_path / "r.onnx", 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", sorted(SEPARATE))
def test_shapes_match_export_is_exact(tmp_path, name):
    """The hard prompt agreement exports (argmax and comparisons); with the shipped classifier (or judge) on world
    scenes, true and altered captions give both values, which the graph reproduces exactly."""
    reward = get_reward(name)
    graph = OnnxReward(export_onnx(reward, tmp_path / "match.onnx"))
    assert graph.image_size == (32, 32) and graph.prompt_inputs == ["count", "color", "shape"]
    batch = sample_batch(6, random.Random(0))
    captions = [text if i % 2 else text.replace(text.split()[0], "three" if text.startswith("one") else "one")
                for i, text in enumerate(batch.captions)]  # fmt: skip
    with torch.no_grad():
        expected = reward(batch.images, captions)
    assert expected.tolist() == [0.0, 1.0] * 3
    assert torch.equal(graph(batch.images, captions), expected)


def prompts_for(reward, n):
    """``n`` prompts the reward accepts, all different for n <= 5."""
    pool = CAPTIONS if reward.name.startswith("shapes") else PROMPTS
    return [pool[i % len(pool)] for i in range(n)]


@pytest.mark.parametrize("name", sorted(PROMPTED))
def test_prompt_reward_export_matches_torch_at_any_batch(name, tmp_path):
    reward = get_reward(name, pretrained=False, **PROMPTED[name])
    path = export_onnx(reward, tmp_path / f"{name}.onnx", (48, 64))
    graph = OnnxReward(path)
    assert graph.needs_prompts and graph.name == name
    assert graph.prompt_inputs == list(reward.prompt_processor([reward.prompt_processor.example]))
    assert all(isinstance(i.shape[0], str) for i in graph.session.get_inputs()), "every batch dimension is symbolic"
    images, prompts = varied(5, 48, 64), prompts_for(reward, 5)
    with torch.no_grad():
        expected = reward(images, prompts)
        shifted = reward(images, prompts[1:] + prompts[:1])
        one_prompt = reward(images, prompts[0])
        # The torch path (text cached per prompt) and the graph's tensor-only path share their maths.
        inputs = prompt_tensors(reward.prompt_processors(), prompts)
        torch.testing.assert_close(reward.compute_inputs(images, inputs), expected, rtol=0, atol=1e-6)
    assert_matches(graph(images, prompts), expected)
    assert_matches(graph(images, prompts[1:] + prompts[:1]), shifted)
    assert_matches(graph(images.numpy(), prompts[0]), one_prompt)
    assert (expected - shifted).abs().max().item() > 10 * tolerance(expected), "prompts must change the scores"
    single = graph(images[:1], prompts[:1])
    assert single.shape == (1,) and abs(single - expected[:1]).item() <= tolerance(expected)


@pytest.mark.parametrize("name", sorted(PROMPTED))
def test_prompt_processors_round_trip_through_json(name):
    processor = get_reward(name, pretrained=False, **PROMPTED[name]).prompt_processor
    rebuilt = processor_from_json(json.loads(json.dumps(processor_to_json(processor))))
    prompts = CAPTIONS if name.startswith("shapes") else PROMPTS
    expected = processor(prompts)
    got = rebuilt(prompts)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(t.dtype == torch.long and t.shape[0] == len(prompts) for t in got.values())
    with pytest.raises(ValueError, match=r"unknown prompt processor kind 'python'; known: .*tokenizer"):
        processor_from_json({"kind": "python", "code": "..."})


def test_a_mix_with_prompt_members(tmp_path):
    pickscore = get_reward("pickscore", pretrained=False, tiny=True)
    hps = get_reward("hpsv2.1", pretrained=False, tiny=True)
    mix = combine({pickscore: 0.1, hps: 2.0, "brightness": 1.0}, normalize={"pickscore": (0.0, 2.0)})
    graph = OnnxReward(export_onnx(mix, tmp_path / "mix.onnx", 40))
    assert graph.prompt_inputs == ["pickscore/input_ids", "hpsv2.1/input_ids"]
    images, prompts = varied(4, 40, 40), PROMPTS[:4]
    with torch.no_grad():
        expected = mix(images, prompts)
    assert_matches(graph(images, prompts), expected)
    assert graph.last_scores.keys() == mix.last_scores.keys() == {"pickscore", "hpsv2.1", "brightness"}
    for key, value in mix.last_scores.items():
        assert_matches(graph.last_scores[key], value, rel=1e-4 if key == "brightness" else 1e-5)


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_export_matches_torch_at_any_batch(name, tmp_path):
    if get_entry(name).missing_packages:
        pytest.skip(f"needs {', '.join(get_entry(name).missing_packages)} (optional extra)")
    reward = get_reward(name, pretrained=False, **EXPORTABLE[name])
    path = export_onnx(reward, tmp_path / f"{name}.onnx", (48, 64))  # traced at batch 2, non-square
    graph = OnnxReward(path)
    assert graph.image_size == (48, 64) and graph.name == name
    assert isinstance(graph.session.get_inputs()[0].shape[0], str), "the batch dimension must be symbolic"
    images = varied(5, 48, 64)
    with torch.no_grad():
        expected = reward(images)
    assert_matches(graph(images), expected)
    single = graph(images[:1])
    assert single.shape == (1,) and abs(single - expected[:1]).item() <= tolerance(expected)


def test_default_size_numpy_input_and_a_mix(tmp_path):
    aesthetic = get_reward("aesthetic", pretrained=False, tiny=True)
    graph = OnnxReward(export_onnx(aesthetic, tmp_path / "a.onnx"))
    assert graph.image_size == (224, 224)  # the reward's input_size
    images = varied(4, 224, 224)
    with torch.no_grad():
        expected = aesthetic(images)
    assert_matches(graph(images.numpy()), expected)

    mix = combine("brightness=2,contrast=-1")
    graph = OnnxReward(export_onnx(mix, tmp_path / "mix.onnx"))
    assert graph.image_size == (512, 512) and graph.members == {"brightness": 2.0, "contrast": -1.0}
    images = varied(3, 512, 512)
    # 1e-4: onnxruntime's ReduceMean sums the 262,144 pixels in float32 one after another (2.7e-5 off the float64
    # mean brightness of these images, where torch's cascade summation is within 1e-8).
    assert_matches(graph(images), mix(images), rel=1e-4)
    assert graph.last_scores.keys() == mix.last_scores.keys() == {"brightness", "contrast"}
    for key, value in mix.last_scores.items():
        assert_matches(graph.last_scores[key], value, rel=1e-4)


def test_external_data_when_over_the_threshold(tmp_path):
    reward = get_reward("shapes", objective="count")
    inline = export_onnx(reward, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()
    external = export_onnx(reward, tmp_path / "external.onnx", external_data_threshold=0)
    data = tmp_path / "external.onnx.data"
    assert data.exists() and external.stat().st_size < 0.2 * inline.stat().st_size < data.stat().st_size
    images = varied(3, 32, 32)
    assert_matches(OnnxReward(external)(images), reward(images))
    export_onnx(reward, external)  # re-exported small: the stale weights file goes
    assert not data.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["external.onnx", "inline.onnx"]


class Failing(Reward):
    name = "failing"

    def score(self, images, prompts):
        raise RuntimeError("broken on purpose")


class FixedBatch(Reward):
    name = "fixed-batch"

    def score(self, images, prompts):
        return images.reshape(len(images), -1).mean(1)


def test_a_failed_export_leaves_nothing_and_keeps_an_earlier_file(tmp_path, monkeypatch):
    with pytest.raises(OnnxExportError, match=r"'failing'.*broken on purpose"):
        export_onnx(Failing(), tmp_path / "failing.onnx", 8)
    assert list(tmp_path.iterdir()) == []

    path = export_onnx(get_reward("brightness"), tmp_path / "r.onnx", 8)
    before = path.read_bytes()

    def write_half(model, staged, external_data=None):
        Path(staged).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("onnx_ir.save", write_half)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(get_reward("contrast"), path, 8)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.onnx"]


class Prompted(Reward):
    """Reads prompts in ``score`` itself, with no prompt processor."""

    name = "prompted"
    needs_prompts = True

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) + torch.tensor([len(p) for p in prompts])


def test_rewards_that_cannot_export_say_why(tmp_path):
    shapes = get_reward("shapes", objective="prompt")
    for reward, which in ((Prompted(), "it"), (combine({shapes: 1.0, Prompted(): 1.0}), "its member 'prompted'")):
        with pytest.raises(OnnxExportError, match=rf"{which} needs prompts but has no prompt_processor"):
            export_onnx(reward, tmp_path / "p.onnx", 8)
    with pytest.raises(OnnxExportError, match=r"'fixed-batch'.*fixes the batch size.*len\(images\)"):
        export_onnx(FixedBatch(), tmp_path / "f.onnx", 8)
    assert list(tmp_path.iterdir()) == []


def test_loading_and_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; export one"):
        OnnxReward(tmp_path / "missing.onnx")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07 not a protobuf")
    with pytest.raises(ValueError, match=r"corrupt\.onnx is not a readable ONNX model"):
        OnnxReward(tmp_path / "corrupt.onnx")
    torch.onnx.export(torch.nn.Linear(2, 1).eval(), (torch.rand(1, 2),), tmp_path / "linear.onnx", verbose=False)
    with pytest.raises(ValueError, match=r"not a reward graph written by rewards\.onnx\.export_onnx"):
        OnnxReward(tmp_path / "linear.onnx")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        OnnxReward(tmp_path / "linear.onnx", device="tpu")

    graph = OnnxReward(export_onnx(get_reward("brightness"), tmp_path / "b.onnx", (16, 24)))
    with pytest.raises(ValueError, match=r"scores 16x24 images; got 24x16.*image_size=\(24, 16\)"):
        graph(torch.rand(2, 3, 24, 16))
    with pytest.raises(ValueError, match="4-D"):
        graph(torch.rand(3, 16, 24))
    with pytest.raises(ValueError, match="floating-point"):
        graph(np.zeros((1, 3, 16, 24), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"look like \[0, 255\]"):
        graph(torch.full((1, 3, 16, 24), 200.0))

    graph = OnnxReward(export_onnx(get_reward("shapes", objective="prompt"), tmp_path / "s.onnx"))
    images = varied(2, 32, 32)
    with pytest.raises(ValueError, match="reward 'shapes' needs prompts"):
        graph(images)
    with pytest.raises(ValueError, match="got 3 prompts for 2 images"):
        graph(images, CAPTIONS[:3])
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        graph(images, "a photo of a cat")


@pytest.fixture
def folder(tmp_path):
    """Four PNGs of two sizes."""
    images = tmp_path / "images"
    images.mkdir()
    generator = np.random.default_rng(0)
    for name, size in (("a.png", (32, 32)), ("b.png", (48, 40)), ("c.png", (32, 32)), ("d.png", (48, 40))):
        scale = generator.uniform(0.2, 1.0)
        pixels = (generator.integers(0, 256, (*size, 3)) * scale).astype(np.uint8)
        Image.fromarray(pixels).save(images / name)
    return images


def score_json(capsys, *argv):
    assert main(["score", *argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "reward", [["--reward", "shapes", "--option", "objective=count"], ["--reward", "brightness=2,contrast=-1"]]
)
def test_cli_onnx_backend_equals_torch(folder, capsys, reward):
    torch_rows = score_json(capsys, str(folder), *reward)
    onnx_rows = score_json(capsys, str(folder), *reward, "--backend", "onnx", "--batch-size", "3")
    assert [row.keys() for row in onnx_rows] == [row.keys() for row in torch_rows] and len(torch_rows) == 4
    for got, expected in zip(onnx_rows, torch_rows, strict=True):
        assert got["path"] == expected["path"]
        for key in set(got) - {"path"}:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)
    assert len({row["score"] for row in torch_rows}) == 4


@pytest.mark.parametrize(
    "reward",
    [
        ["--reward", "pickscore", "--random-weights", "--weights", "TINY", "--prompt", "a cat"],
        ["--reward", "shapes", "--option", "objective=prompt", "--prompts-file", "CAPTIONS"],
    ],
)
def test_cli_onnx_backend_with_prompts_equals_torch(folder, tmp_path, capsys, reward):
    """Both backends build the reward from the same weights (the shipped classifier, or a saved tiny PickScore)."""
    from transformers import CLIPModel

    from rewards.pickscore import pickscore_config

    CLIPModel(pickscore_config(tiny=True)).save_pretrained(tmp_path / "tiny")
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS[:4]))
    files = {"TINY": str(tmp_path / "tiny"), "CAPTIONS": str(tmp_path / "captions.txt")}
    reward = [files.get(item, item) for item in reward]
    torch_rows = score_json(capsys, str(folder), *reward)
    onnx_rows = score_json(capsys, str(folder), *reward, "--backend", "onnx", "--batch-size", "3")
    assert len(onnx_rows) == len(torch_rows) == 4
    for got, expected in zip(onnx_rows, torch_rows, strict=True):
        assert got["path"] == expected["path"] and got.keys() == {"path", "score"}
        assert got["score"] == pytest.approx(expected["score"], rel=1e-5, abs=1e-6)
    assert len({row["score"] for row in torch_rows}) == 4
    assert main(["score", str(folder), *reward[:-2], "--backend", "onnx"]) == 2
    assert "needs prompts" in capsys.readouterr().err


def test_cli_onnx_file_is_exported_once_then_reused(folder, tmp_path, capsys):
    file = tmp_path / "shapes.onnx"
    reward = ["--reward", "shapes", "--option", "objective=count", "--backend", "onnx", "--onnx-file", str(file)]
    first = score_json(capsys, str(folder / "a.png"), str(folder / "c.png"), *reward)
    assert file.exists()
    stamp = file.stat().st_mtime_ns
    second = score_json(capsys, str(folder / "c.png"), *reward)
    assert file.stat().st_mtime_ns == stamp and second[0]["score"] == first[1]["score"]

    assert main(["score", str(folder), *reward]) == 2  # a.png is 32x32, b.png 48x40
    assert "scores 32x32 images and some images are 48x40" in capsys.readouterr().err
    assert main(["score", str(folder / "a.png"), "--reward", "brightness", "--backend", "onnx",
                 "--onnx-file", str(file)]) == 2  # fmt: skip
    assert f"{file} holds reward 'shapes', not 'brightness'" in capsys.readouterr().err
    assert main(["score", str(folder), "--reward", "brightness", "--onnx-file", str(file)]) == 2
    assert "--onnx-file goes with --backend onnx" in capsys.readouterr().err


def test_cli_export(folder, tmp_path, capsys):
    file = tmp_path / "out" / "size.onnx"
    assert main(["export", "shapes", "--option", "objective=size", "--output", str(file), "--image-size", "48x40"]) == 0
    assert "for 48x40 images (any batch)" in capsys.readouterr().out
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(folder / n), np.float32) / 255).permute(2, 0, 1)
                          for n in ("b.png", "d.png")])  # fmt: skip
    assert_matches(OnnxReward(file)(images), get_reward("shapes", objective="size")(images))

    prompted = tmp_path / "out" / "pickscore.onnx"
    assert main(["export", "pickscore", "--random-weights", "--option", "tiny=true", "--output", str(prompted)]) == 0
    assert "for 224x224 images (any batch)" in capsys.readouterr().out
    assert OnnxReward(prompted).prompt_inputs == ["input_ids"]
    assert main(["export", "brightness", "--output", str(file), "--image-size", "big"]) == 2
    assert "--image-size 'big'" in capsys.readouterr().err
    assert OnnxReward(file).name == "shapes", "failed exports must leave the earlier file alone"


def test_missing_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install -e '.\[onnx\]'"):
        rewards.onnx.OnnxReward("any.onnx")


def test_benchmark_smoke():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "onnx_scoring.py"), "--tiny", "--batch", "2", "--repeats", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "images/s" in result.stdout and "onnxruntime / torch:" in result.stdout
