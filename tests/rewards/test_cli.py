"""``python -m rewards``: scoring folders of PNGs (every output format, mixes, prompts, corrupt files); --help and
argument errors without heavy imports; hints spelled as flags."""

import ast
import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import MissingWeightsError, get_reward
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


HEAVY = ("torch", "transformers", "open_clip", "numpy", "PIL", "safetensors", "huggingface_hub", "diffusers")


def run_cli(*argv):
    """``python -m rewards ARGV`` in a fresh interpreter: (exit code, stdout, stderr, heavy modules imported)."""
    script = (
        "import runpy, sys\n"
        "sys.argv = ['rewards', *sys.argv[1:]]\n"
        "code = 0\n"
        "try:\n"
        "    runpy.run_module('rewards', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
    *err, last = done.stderr.strip().splitlines()
    assert last.startswith("HEAVY ")
    return done.returncode, done.stdout, "\n".join(err), ast.literal_eval(last.removeprefix("HEAVY "))


@pytest.mark.parametrize("command", [[], ["score"], ["export"], ["list"]])
def test_help_imports_nothing_heavy_and_shows_defaults(command):
    code, out, _, heavy = run_cli(*command, "--help")
    assert code == 0 and heavy == []
    assert "usage: python -m rewards" in out
    if command == ["score"]:
        assert "(default: 8)" in out and "(default: table)" in out and "clip=DIR,head=FILE" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["score", "no-such.png", "--reward", "brightness"], "no such file or folder: no-such.png"),
        (["score", "{folder}", "--reward", "brightness", "--option", "gain"], "--option 'gain': expected KEY=VALUE"),
        (["score", "{folder}", "--reward", "aesthetic", "--weights", "clip=DIR,head"], "expected COMPONENT=PATH"),
        (["score", "{folder}", "--reward", "brightness", "--onnx-file", "x.onnx"], "--onnx-file goes with --backend"),
        (["score", "{folder}", "--reward", "x", "--prompts-file", "none.txt"], "--prompts-file none.txt: no such"),
        (["export", "brightness", "--output", "x.onnx", "--image-size", "0x2"], "--image-size '0x2': expected"),
        (["export", "brightness", "--output", "{folder}"], "is a folder; give the .onnx file to write"),
    ],
)
def test_argument_errors_come_before_any_heavy_import(folder, argv, message):
    code, _, err, heavy = run_cli(*(a.format(folder=folder) for a in argv))
    assert code == 2 and message in err and heavy == []


def test_hints_on_the_command_line_are_flags(folder, capsys):
    assert main(["score", str(folder), "--reward", "owlvit", "--random-weights"]) == 2
    err = capsys.readouterr().err
    assert "--option query=strawberry --option mode=add" in err and "get_reward(" not in err
    assert main(["score", str(folder), "--reward", "shapes"]) == 2
    err = capsys.readouterr().err
    assert "--option objective=count --option mode=remove" in err and "objective='count'" not in err
    assert main(["score", str(folder), "--reward", "aesthetic", "--random-weights", "--weights", "head.pth"]) == 2
    assert "--weights clip=PATH,head=PATH" in capsys.readouterr().err
    # A missing download names every file the reward needs, as --weights takes them.
    assert main(["score", str(folder), "--reward", "aesthetic"]) == 2
    err = capsys.readouterr().err
    assert "--weights clip=CLIP_DIR,head=HEAD_DIR/sac+logos+ava1-l14-linearMSE.pth" in err
    assert "hf download openai/clip-vit-large-patch14 config.json model.safetensors" in err
    assert "get_reward(" not in err and "weights={" not in err
    # The Python API keeps Python spellings.
    with pytest.raises(ValueError, match=r"e\.g\. get_reward\('owlvit', query='strawberry', mode='add'\)"):
        get_reward("owlvit", pretrained=False, tiny=True)


def test_offline_hub_error_is_not_cut_mid_word(capsys):
    """The hub's own reason appears whole (it was cut at 160 characters)."""
    from rewards.weights import _reason

    with pytest.raises(MissingWeightsError) as info:
        get_reward("pickscore")
    cause = str(info.value.__cause__).strip().splitlines()[0]
    assert f"({type(info.value.__cause__).__name__}: {cause})" in str(info.value)
    long = ValueError(" ".join(["word"] * 100))
    assert _reason(long).endswith("word ...") and len(_reason(long)) < 320
