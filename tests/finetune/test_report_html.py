"""The self-contained run report: embedded images, escaped text, and a clean render in headless Chromium."""

import re

import torch

from finetune.report_html import HtmlReport, metric_panels, training_report
from tests.browser import assert_renders

PROMPTS = ["a red fox", "two <b>bold</b> & <script>alert(1)</script> cats"]


def history():
    rows = [{"step": 0, "eval_reward": 0.1, "judge/aesthetic": 5.0, "diversity": 0.3}]
    for step in range(1, 5):
        rows.append({"step": step, "reward": 0.1 + step / 100, "sec_per_step": 0.5, "anchor": step / 1000})
    rows.append({"step": 4, "eval_reward": 0.14, "judge/aesthetic": 4.5, "diversity": 0.1})
    return rows


def test_training_report_renders_in_chromium(tmp_path):
    images = torch.rand(len(PROMPTS) * 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = training_report(
        "run <1>",
        history(),
        PROMPTS,
        3,
        (0, images),
        (4, images.flip(-1)),
        {"lr": 1e-4, "eval_seeds": [0, 1, 2], "early_stop": None},
        notes=["warning: a note"],
        timings={"mean training step": 0.5},
    )
    path = report.write(tmp_path / "report.html")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"], "no temporary file is left"
    text = path.read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text
    sources = re.findall(r'<img src="([^"]*)"', text)
    assert len(sources) == 2 * len(PROMPTS) + 1 and all(s.startswith("data:image/png;base64,") for s in sources)
    page = assert_renders(path, tmp_path / "screenshot.png", min_images=2 * len(PROMPTS) + 1)
    assert all(prompt in page.text for prompt in PROMPTS), "each prompt is shown under its row"
    assert page.title == "run <1>" and "judge/aesthetic" in page.text and "mean training step" in page.text


def test_metric_panels_follow_what_was_logged():
    assert metric_panels(history()) == {
        "training reward": ["reward", "eval_reward"],
        "judge/aesthetic": ["judge/aesthetic"],
        "diversity": ["diversity"],
        "anchor": ["anchor"],
    }
    assert metric_panels([{"step": 1, "reward": 0.2}]) == {"training reward": ["reward"]}


def test_a_report_without_images_still_renders(tmp_path):
    page = HtmlReport("empty")
    page.table(["a"], [[1.23456789]])
    path = page.write(tmp_path / "r.html")
    assert "1.235" in path.read_text()
