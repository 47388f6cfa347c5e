"""``python -m rewards score``: folders of PNGs, every output format, mixes, prompts, and corrupt files."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import get_reward
from rewards.__main__ import load_image, main


@pytest.fixture
def folder(tmp_path):
    """Three PNGs (two sizes) and one corrupt file."""
    generator = np.random.default_rng(0)
    for name, size in (("a.png", (32, 32)), ("b.png", (48, 40)), ("c.png", (32, 32))):
        pixels = generator.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path


def expected_scores(folder, reward):
    return {p.name: reward(load_image(p)[None]).item() for p in sorted(folder.glob("[abc].png"))}


@pytest.mark.parametrize("format", ["table", "csv", "json"])
def test_scores_a_folder_and_skips_a_corrupt_file(folder, capsys, format):
    assert main(["score", str(folder), "--reward", "brightness", "--format", format, "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert "skipped" in err and "broken.png" in err and "1 of 4 files could not be read" in err
    expected = expected_scores(folder, get_reward("brightness"))
    if format == "json":
        rows = json.loads(out)
    elif format == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
    else:
        lines = out.strip().splitlines()
        assert lines[0].split() == ["path", "score"]
        rows = [dict(zip(["path", "score"], line.split(), strict=True)) for line in lines[1:]]
    assert [row["path"].rsplit("/", 1)[-1] for row in rows] == ["a.png", "b.png", "c.png"]
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected[row["path"].rsplit("/", 1)[-1]], rel=1e-4)


def test_mix_reports_member_scores(folder, capsys):
    assert main(["score", str(folder / "a.png"), "--reward", "brightness=2,contrast=-1", "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    image = load_image(folder / "a.png")[None]
    brightness, contrast = get_reward("brightness")(image).item(), get_reward("contrast")(image).item()
    assert row["brightness"] == pytest.approx(brightness) and row["contrast"] == pytest.approx(contrast)
    assert row["score"] == pytest.approx(2 * brightness - contrast, rel=1e-5)


def test_options_random_weights_and_prompts(folder, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na bird\n")
    code = main(["score", str(folder), "--reward", "resnet50", "--random-weights", "--option", "target=cat",
                 "--prompts-file", str(tmp_path / "prompts.txt"), "--format", "json"])  # fmt: skip
    assert code == 2 and "3 prompts for 4 image files" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na bird\na broken file\n")
    torch.manual_seed(0)
    code = main(["score", str(folder), "--reward", "resnet50", "--random-weights", "--option", "target=cat",
                 "--prompts-file", str(tmp_path / "prompts.txt"), "--format", "json"])  # fmt: skip
    assert code == 0 and len(json.loads(capsys.readouterr().out)) == 3


def test_no_images_and_unknown_reward(tmp_path, capsys):
    assert main(["score", str(tmp_path), "--reward", "brightness"]) == 2
    assert "no image files found" in capsys.readouterr().err
    (tmp_path / "x.png").write_bytes(b"")
    assert main(["score", str(tmp_path), "--reward", "brigthness"]) == 2
    assert "Did you mean 'brightness'" in capsys.readouterr().err
