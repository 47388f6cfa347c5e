"""The benchmark scripts run end to end in their small modes (the GPU script's --smoke on the CPU)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(report: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("|")[1:-1]] for line in report.splitlines() if line.startswith("| DRaFT")
    ]


def check_rows(rows: list[list[str]]) -> None:
    for row in rows:
        batch, seconds, images_per_second = int(row[2]), float(row[3]), float(row[4])
        assert seconds > 0 and images_per_second == pytest.approx(batch / seconds, rel=0.01, abs=0.005)  # 2 decimals
        assert re.fullmatch(r"\d+\.\d%", row[6]), row  # fraction of the FLOP floor


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_gpu_benchmark_smoke_report_for_a_unet_and_a_transformer_family(tmp_path, family):
    """The family's tiny pipeline through the GPU benchmark's code path on the CPU: batch 1 for DRaFT-1 and
    DRaFT-LV, then the batch search, with the commit it ran on in the report. (The benchmark's code is the same for
    every family but the pipeline it builds; SDXL and SD3 sampling is covered by tests/finetune/test_families.py.)"""
    report_path = tmp_path / "report.md"
    run(
        "gpu_families.py",
        "--family",
        family,
        "--smoke",
        "--prefixes",
        "eager",
        "--repeats",
        "1",
        "--output",
        str(report_path),
    )
    report = report_path.read_text()
    rows = table_rows(report)
    assert [row[:3] for row in rows] == [
        ["DRaFT-1", "eager", "1"],
        ["DRaFT-LV", "eager", "1"],
        ["DRaFT-1, chunk 1", "eager", "2"],
    ]
    check_rows(rows)
    assert f"{family} pipeline `tiny`" in report and "64x64, T = 3" in report
    assert re.search(r"^commit [0-9a-f]{7,}", report, re.M) and "load average (1 min) at start" in report
    assert "Largest batch that fitted: 2" in report and "FLOP floor at" in report


@pytest.mark.slow
def test_gpu_benchmark_smoke_compiles_the_prefix(tmp_path):
    report_path = tmp_path / "report.md"
    run("gpu_families.py", "--smoke", "--repeats", "1", "--output", str(report_path))
    rows = table_rows(report_path.read_text())
    assert [row[:3] for row in rows] == [
        ["DRaFT-1", "eager", "1"],
        ["DRaFT-LV", "eager", "1"],
        ["DRaFT-1", "compiled", "1"],
        ["DRaFT-LV", "compiled", "1"],
        ["DRaFT-1, chunk 1", "eager", "2"],
    ]
    check_rows(rows)


def test_gpu_benchmark_stops_measuring_when_the_time_budget_is_spent(tmp_path):
    report_path = tmp_path / "report.md"
    run("gpu_families.py", "--smoke", "--time-budget", "0", "--output", str(report_path))
    report = report_path.read_text()
    assert not table_rows(report)
    assert report.count("Not measured:") == 5 and "Largest batch that fitted: None" in report


def test_gpu_benchmark_refuses_an_unknown_prefix_variant():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_families.py"), "--smoke", "--prefixes", "eager,jit"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "unknown prefix variant(s) ['jit']" in result.stderr


def test_step_breakdown_prints_every_phase():
    out = run("step_breakdown.py", "--size", "tiny", "--steps", "3", "--repeats", "1", "--variants", "plain,anchored")
    for phase in ("no-grad sampling", "grad steps forward", "decode", "reward", "grad steps backward", "optimizer"):
        assert re.search(rf"^\s*{re.escape(phase)}\s+\d+\.\d+", out, re.M), phase
    assert re.search(r"fraction of the FLOP floor: \d+\.\d%", out)
    assert re.search(r"achieved \d+\.\d+ TFLOP/s", out)
    assert re.search(r"anchored\s+\d+\.\d+\s+\d+\.\d+", out)


def test_gradient_variance_smoke_reports_the_recorded_gradients_covariance_trace(tmp_path):
    """The variance reported for each method is the trace of the sample covariance of the gradients it drew
    (computed here from the saved gradients), the ratios are those variances' ratios, and a DRaFT-LV step with n
    copies queries the reward n times per image."""
    from safetensors.torch import load_file

    run(
        "gradient_variance.py",
        *("--settings", "sd", "--draws", "3", "--batch", "2", "--sampling-steps", "2", "--warmup", "1"),
        *("--bootstrap", "20", "--output", str(tmp_path), "--save-gradients", str(tmp_path / "g.safetensors")),
    )
    result = json.loads((tmp_path / "gradient_variance.json").read_text())["results"]["sd"]
    methods = result["methods"]
    assert list(methods) == ["DRaFT-1", "DRaFT-LV n=1", "DRaFT-LV n=2", "DRaFT-LV n=4", "ReFL"]
    gradients = load_file(str(tmp_path / "g_sd.safetensors"))
    for name, m in methods.items():
        g = gradients[name]
        assert g.shape == (3, result["parameters"])
        trace = ((g - g.mean(0)) ** 2).sum().item() / (len(g) - 1)
        assert m["variance"] == pytest.approx(trace, rel=1e-9) and trace > 0
        assert m["mean_norm_sq"] == pytest.approx(g.mean(0).square().sum().item() - trace / len(g), rel=1e-9)
        assert m["ratio_to_draft1"] == pytest.approx(m["variance"] / methods["DRaFT-1"]["variance"])
        assert m["variance_ci"][0] <= m["variance_ci"][1] and m["seconds_per_step"] > 0
    assert [m["reward_queries"] for m in methods.values()] == [2, 2, 4, 8, 2]
    ratio = methods["DRaFT-LV n=2"]["ratio_to_draft1"]
    report = (tmp_path / "gradient_variance.md").read_text()
    assert f"Variance ratio DRaFT-LV n=2 / DRaFT-1: **{ratio:.2f}**" in report
    assert re.search(r"^commit [0-9a-f]{7,}", report, re.M)


def test_sample_efficiency_smoke_thresholds_and_ratios_follow_the_recorded_curves(tmp_path):
    """Each reported number of reward queries lies between the two evaluations whose gains bracket the threshold,
    DRaFT-LV (n = 2) counts two reward queries per image, and each ratio is the quotient of the reported counts."""
    run("sample_efficiency.py", "--smoke", "--methods", "draft-lv,draft-k", "--lrs", "3e-3", "--output", str(tmp_path))
    summary = json.loads((tmp_path / "sample_efficiency.json").read_text())
    assert (tmp_path / "sample_efficiency.png").stat().st_size > 0
    methods = summary["methods"]
    assert list(methods) == ["draft-lv", "draft-k"] and summary["best"] in methods
    for point in (p for curve in methods["draft-lv"]["curves"] for p in curve):
        assert point["queries"] == 2 * point["images"]
    for name, result in methods.items():
        assert len(result["curves"]) == 2 and result["lr"] == 3e-3
        for fraction in ("0.5", "0.8"):
            target = float(fraction) * summary["best_gain"]
            for curve, queries in zip(result["curves"], summary["reached"][name][fraction]["queries"], strict=True):
                gains = [p["reward"] - curve[0]["reward"] for p in curve]
                first = next((i for i, g in enumerate(gains) if g >= target), None)
                if first is None or first == 0:
                    assert queries is None if first is None else queries is not None
                    continue
                assert gains[first - 1] < target and curve[first - 1]["queries"] <= queries <= curve[first]["queries"]
    for key, ratio in summary["ratios"].items():
        fraction, axis = key.split(" ")[1:]
        top, bottom = (summary["reached"][m][fraction][axis] for m in ("draft-k", "draft-lv"))
        expected = [a / b if a is not None and b else None for a, b in zip(top, bottom, strict=True)]
        assert ratio["per_seed"] == pytest.approx(expected)
    report = (tmp_path / "sample_efficiency.md").read_text()
    assert "| draft-k/draft-lv | 50% | queries |" in report and "load average (1 min) at end" in report


def test_ddpo_jpeg_smoke_reports_the_paired_gain_and_the_loaded_lora_reproduces_the_trainer(tmp_path):
    """The reported gain is the held-out mean after minus before, inside its bootstrap interval, and the LoRA file
    loaded by diffusers scores what the trainer's own last evaluation scored on the same prompts and seeds."""
    run("ddpo_jpeg.py", "--smoke", "--output", str(tmp_path))
    summary = json.loads((tmp_path / "ddpo_jpeg_cpu.json").read_text())
    (result,) = summary["runs"]
    assert result["queries"] == 2 and summary["images"] == 12
    assert result["gain"] == pytest.approx(result["after"] - result["before"], abs=1e-6)
    assert result["interval"][0] <= result["gain"] <= result["interval"][1]
    assert result["rose"] + result["fell"] <= 1
    first, last = result["trainer_eval"]
    assert abs(last - first) > 1e-3  # training moved the trainer's evaluation, ...
    assert result["loaded_eval"] == pytest.approx(last, abs=2e-4)  # ... and the loaded file moves it as far
    report = (tmp_path / "ddpo_jpeg_cpu.md").read_text()
    assert re.search(r"^commit [0-9a-f]{7,}", report, re.M) and f"{result['gain']:+.4f}" in report
