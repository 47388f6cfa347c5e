"""The benchmark scripts run end to end in their small modes (the GPU script's --smoke on the CPU)."""

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
    out = run(
        "step_breakdown.py", "--size", "tiny", "--steps", "3", "--repeats", "1", "--variants", "plain,eager-attention"
    )
    for phase in ("no-grad sampling", "grad steps forward", "decode", "reward", "grad steps backward", "optimizer"):
        assert re.search(rf"^\s*{re.escape(phase)}\s+\d+\.\d+", out, re.M), phase
    assert re.search(r"fraction of the FLOP floor: \d+\.\d%", out)
    assert re.search(r"achieved \d+\.\d+ TFLOP/s", out)
    assert re.search(r"eager-attention\s+\d+\.\d+\s+\d+\.\d+", out)
