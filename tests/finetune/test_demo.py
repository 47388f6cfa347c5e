"""A shortened ``python -m finetune demo``: every artefact exists and is valid."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from compose import load_lora
from finetune.__main__ import build_parser
from finetune.demo import (
    AGREEMENT_JUDGE,
    DEMO_JUDGES,
    OBJECTIVES,
    SIZE_JUDGE,
    STORY,
    Demo,
    DemoConfig,
    report,
    run_demo,
)
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
    names = ["grid_base", "grid_mixed", "mixing_grid", "reward_curve", "overoptimisation"]
    names += [f"grid_{label}" for label in (*(o.name for o in OBJECTIVES), *STORY)]
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
    assert {r["run"] for r in rows} == {o.name for o in OBJECTIVES} | set(STORY)
    assert all("reward" in r for r in rows if r["step"] > 0 and "early_stop_metric" not in r)
    assert len(summary["mixing"]["cells"]) == 9
    report = (out / "report.md").read_text()
    assert "| base model |" in report and "prompt agreement" in report and "| +1.5 |" in report
    assert json.loads((out / "summary.json").read_text())["base"] == summary["base"]
    judges = [f"judge/{name}" for name in DEMO_JUDGES]
    assert all(key in summary[label] for key in judges for label in ("base", *(o.name for o in OBJECTIVES)))


def test_the_size_gain_is_judged_independently(demo):
    """report.md states the 'bigger' LoRA's size gain as the independent judge reads it, the gap to the training
    reward's gain, and its prompt agreement, from the measured scores; the judges are not the trained classifier."""
    out, summary = demo
    base, bigger = summary["base"], summary["bigger"]
    size = f"judge/{SIZE_JUDGE}"
    gain, judged = bigger["bigger"] - base["bigger"], bigger[size] - base[size]
    line = next(x for x in (out / "report.md").read_text().splitlines() if "read by the judges independent" in x)
    assert f"({judged:+.3f} by `{SIZE_JUDGE}`, against {gain:+.3f} by the training reward: a gap of" in line
    assert (
        f"{gain - judged:+.3f}" in line and f"{bigger[f'judge/{AGREEMENT_JUDGE}']:.1%} by `{AGREEMENT_JUDGE}`" in line
    )
    assert all(reward not in ("shapes", "shapes-match") for reward, _ in DEMO_JUDGES.values())


def test_overoptimisation_story(demo):
    """The story's runs follow the config (story lr; 2/5 of the steps, at least 1; early stopping on the first
    judge only in the guarded run) and their numbers reach report.md: the table rows and the step early stopping
    kept."""
    out, summary = demo
    story = summary["story"]
    assert story["steps"] == 1 and story["lr"] == DemoConfig.story_lr
    for run in STORY:
        settings = yaml.safe_load((out / run / "training_config.yaml").read_text())
        assert settings["lr"] == story["lr"] and settings["steps"] == 1
        assert settings["early_stop"] == (f"judge={AGREEMENT_JUDGE},patience=2,drop=0.02" if run == "guarded" else None)
    final = json.loads((out / "guarded" / "metrics.jsonl").read_text().splitlines()[-1])
    guarded = story["guarded"]
    assert final["early_stop_metric"] == f"judge/{AGREEMENT_JUDGE}" and final["best_step"] == guarded["kept_step"]
    text = (out / "report.md").read_text()
    assert "## Over-optimisation" in text and f"| guarded (kept step {guarded['kept_step']}) |" in text
    assert f"| hacked (step 1) | {story['hacked']['bigger']:.3f} |" in text


def test_story_verdicts_follow_the_numbers(demo):
    """The sentences under the story's table say 'rose' or 'fell' as the measured numbers do."""
    _, summary = demo
    config = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()})
    base = {**summary["base"], "bigger": 0.4, "diversity": 0.3, f"judge/{AGREEMENT_JUDGE}": 0.9}
    hacked = {**summary["story"]["hacked"], "bigger": 0.8, "diversity": 0.1, f"judge/{AGREEMENT_JUDGE}": 0.5}
    story = {**summary["story"], "hacked": hacked}
    text = report({**summary, "base": base, "story": story}, config)
    line = next(x for x in text.splitlines() if x.startswith("- hacked against the base model"))
    assert "bigger 0.400 -> 0.800 (rose)" in line and "diversity 0.300 -> 0.100 (fell)" in line
    assert f"judge/{AGREEMENT_JUDGE} 0.900 -> 0.500 (fell)" in line


def test_html_report_renders_in_chromium(demo, tmp_path):
    """Every held-out prompt's images from the base model, each LoRA, the mix and the story's two runs (12 x 6), the
    curves, the story's plot and the mixing grid load; no console error, nothing fetched; each prompt is written on
    the page."""
    out, summary = demo
    page = assert_renders(out / "report.html", tmp_path / "demo-report.png", min_images=12 * 6 + 3)
    assert all(prompt in page.text for prompt in summary["held_out_prompts"])
    assert "prompt agreement" in page.text and page.title.startswith("DRaFT demo")
    assert "Over-optimisation" in page.text and f"judge/{AGREEMENT_JUDGE}" in page.text


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
