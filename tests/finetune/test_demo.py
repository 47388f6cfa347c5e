"""A shortened ``python -m finetune demo``: every artefact exists and is valid."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from compose import load_lora
from finetune.__main__ import build_parser
from finetune.demo import OBJECTIVES, Demo, DemoConfig, report, run_demo
from finetune.world import split_prompts
from finetune.world.pipeline import load_world_pipeline
from tests.browser import assert_renders


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(
        output_dir=str(out), steps=2, batch_size=2, num_inference_steps=3, eval_seeds=(0,), mix_weights=(-1.0, 0.0, 1.5)
    )
    return out, run_demo(config)


def test_prompts_are_held_out():
    train, held_out = split_prompts()
    assert not set(train) & set(held_out) and len(train) + len(held_out) == 36


def test_images_decode(demo):
    out, _ = demo
    names = ["grid_base", "grid_mixed", "mixing_grid", "reward_curve"] + [f"grid_{o.name}" for o in OBJECTIVES]
    for name in names:
        with Image.open(out / f"{name}.png") as image:
            image.load()
            assert image.width > 32 and image.height > 32
    with Image.open(out / "grid_base.png") as image:  # 12 held-out prompts x 1 seed, 32 px enlarged 4x
        margin = image.width - 128
        assert image.height == 12 * 128 and margin > 60, "each row is labelled with its prompt on the left"
        labels = np.asarray(image.convert("L"))[:, :margin]
        assert all((labels[r * 128 : (r + 1) * 128] < 128).any() for r in range(12)), "a row without its prompt"


def test_loras_load_in_both_formats(demo):
    out, _ = demo
    for objective in OBJECTIVES:
        run = out / objective.name
        diffusers_lora, kohya_lora = load_lora(run), load_lora(run / f"{objective.name}_kohya.safetensors")
        assert set(diffusers_lora.modules) == set(kohya_lora.modules)
        for name, module in diffusers_lora.modules.items():
            assert torch.allclose(module.delta(), kohya_lora.modules[name].delta(), atol=1e-6)
        for path in (run / "pytorch_lora_weights.safetensors", run / f"{objective.name}_kohya.safetensors"):
            with safe_open(str(path), "pt") as f:
                header = f.metadata()
            # Both files say what they were trained on, and neither claims a real base model's label.
            assert header["ss_sd_model_name"] == "shapes-pipeline" and "ss_base_model_version" not in header
        pipeline = load_world_pipeline()
        pipeline.load_lora_weights(str(run))  # diffusers' own loader
        pipeline = load_world_pipeline()
        pipeline.load_lora_weights(str(run / f"{objective.name}_kohya.safetensors"))  # and its kohya converter


def test_metrics_and_report(demo):
    out, summary = demo
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == {o.name for o in OBJECTIVES}
    assert all("reward" in r for r in rows if r["step"] > 0)
    assert len(summary["mixing"]["cells"]) == 9
    report = (out / "report.md").read_text()
    assert "| base model |" in report and "prompt agreement" in report and "| +1.5 |" in report
    assert json.loads((out / "summary.json").read_text())["base"] == summary["base"]


def test_html_report_renders_in_chromium(demo, tmp_path):
    """Every held-out prompt's images from the base model, each LoRA and the mix (12 x 4), the curves and the
    mixing grid load; no console error, nothing fetched; each prompt is written on the page."""
    out, summary = demo
    page = assert_renders(out / "report.html", tmp_path / "demo-report.png", min_images=12 * 4 + 2)
    assert all(prompt in page.text for prompt in summary["held_out_prompts"])
    assert "prompt agreement" in page.text and page.title.startswith("DRaFT demo")


def test_a_failed_plot_keeps_the_finished_work(demo, tmp_path, capsys):
    """A late cosmetic stage that fails (here: matplotlib missing) is reported and skipped; the run goes on."""
    _, summary = demo
    runner = Demo(DemoConfig(output_dir=str(tmp_path)))

    def plot_without_matplotlib():
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    runner.cosmetic("reward_curve.png", plot_without_matplotlib)
    assert runner.skipped == ["reward_curve.png"]
    err = capsys.readouterr().err
    assert "reward_curve.png not written" in err and "`python -m pip install matplotlib`" in err
    config = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()})
    text = report({**summary, "skipped": ["reward_curve.png"]}, config)
    assert "Not written (see the run's warnings): reward_curve.png" in text


def test_cli_parses_demo():
    args = build_parser().parse_args(["demo", "--output-dir", "x", "--steps", "3"])
    assert (args.command, args.output_dir, args.steps) == ("demo", "x", 3)
