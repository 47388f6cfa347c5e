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


@pytest.mark.slow
def test_gpu_sd15_smoke_report(tmp_path):
    report_path = tmp_path / "report.md"
    run("gpu_sd15.py", "--smoke", "--repeats", "1", "--output", str(report_path))
    report = report_path.read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| DRaFT", line)]
    assert [row.split("|")[1:4] for row in rows] == [
        [" DRaFT-1 ", " eager ", " 2 "],
        [" DRaFT-LV ", " eager ", " 2 "],
        [" DRaFT-1 ", " compiled ", " 2 "],
        [" DRaFT-LV ", " compiled ", " 2 "],
        [" DRaFT-1, chunk 2 ", " eager ", " 4 "],
    ]
    for row in rows:
        seconds, images_per_second = (float(cell) for cell in row.split("|")[4:6])
        assert seconds > 0 and images_per_second == pytest.approx(int(row.split("|")[3]) / seconds, rel=0.01)
    assert "Largest batch that fitted: 4" in report and "FLOP floor at" in report


def test_gpu_sd15_stops_measuring_when_the_time_budget_is_spent(tmp_path):
    report_path = tmp_path / "report.md"
    run("gpu_sd15.py", "--smoke", "--time-budget", "0", "--output", str(report_path))
    report = report_path.read_text()
    assert not re.search(r"^\| DRaFT", report, re.M)
    assert report.count("Not measured:") == 5 and "Largest batch that fitted: None" in report


def test_step_breakdown_prints_every_phase():
    out = run(
        "step_breakdown.py", "--size", "tiny", "--steps", "3", "--repeats", "1", "--variants", "plain,eager-attention"
    )
    for phase in ("no-grad sampling", "grad steps forward", "decode", "reward", "grad steps backward", "optimizer"):
        assert re.search(rf"^\s*{re.escape(phase)}\s+\d+\.\d+", out, re.M), phase
    assert re.search(r"fraction of the FLOP floor: \d+\.\d%", out)
    assert re.search(r"achieved \d+\.\d+ TFLOP/s", out)
    assert re.search(r"eager-attention\s+\d+\.\d+\s+\d+\.\d+", out)
