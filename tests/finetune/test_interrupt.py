"""Ctrl-C and SIGTERM during ``python -m finetune train``: the run finishes its step, writes a checkpoint, prints
the ``--resume`` command and exits 130 / 143; resuming ends at the same LoRA as a run never interrupted. A second
Ctrl-C exits at once and leaves no torn checkpoint."""

import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from finetune.__main__ import main
from finetune.checkpoint import LATEST, META_FILE

STEPS = 12
LORA = "pytorch_lora_weights.safetensors"


def arguments(model_dir, output_dir):
    return [
        "train", "--model", str(model_dir), "--reward", "contrast", "--method", "draft-k", "--steps", str(STEPS),
        "--batch-size", "1", "--resolution", "64", "--num-inference-steps", "3", "--guidance-scale", "3",
        "--lr", "0.01", "--output-dir", str(output_dir), "--device", "cpu", "--eval-every", "1000",
        "--checkpoint-every", "1000",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(arguments(tiny_model_dir, out)) == 0
    return load_file(str(out / LORA))


def start_and_signal(model_dir, out, signals, extra=(), timeout=300):
    """Start a CLI run, wait until it has logged step 2, send each of ``signals`` once the run has reported the
    previous one; returns (exit code, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", *arguments(model_dir, out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()

    def wait_for(condition, what):
        deadline = time.monotonic() + timeout
        while not condition():
            assert process.poll() is None, f"the run ended before {what}: {''.join(err)[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, "step 2")  # step 0 is an eval
    for count, signum in enumerate(signals, start=1):
        process.send_signal(signum)
        if count < len(signals):
            wait_for(lambda count=count: "".join(err).count(" received: finishing") >= count, "the signal's report")
    process.wait(timeout=timeout)
    reader.join(timeout=10)
    return process.returncode, "".join(err)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_with_checkpoint_and_resume_gives_the_same_lora(tiny_model_dir, tmp_path, uninterrupted, signum):
    out = tmp_path / "run"
    code, err = start_and_signal(tiny_model_dir, out, [signum])
    assert code == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    step = int(re.search(r"stopped after step (\d+)", err).group(1))
    assert 2 <= step < STEPS
    assert (out / "checkpoints" / f"step_{step:06d}" / META_FILE).exists()
    assert not (out / LORA).exists(), "an interrupted run must not leave a final-looking LoRA"
    command = re.search(r"resume with: (.+)", err).group(1)
    assert command.endswith("--resume")
    resumed = subprocess.run(
        [sys.executable, *shlex.split(command)[1:]], capture_output=True, text=True, timeout=300, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lora = load_file(str(out / LORA))
    assert lora.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(lora[key], value), key


def test_second_interrupt_exits_at_once_without_a_torn_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # Full DRaFT over 10 steps: a step long enough that the second signal lands inside it.
    slow_steps = ["--method", "draft", "--num-inference-steps", "10", "--batch-size", "2"]
    code, err = start_and_signal(tiny_model_dir, out, [signal.SIGINT, signal.SIGINT], slow_steps)
    assert code == 130, err[-3000:]
    assert "stopped at once" in err and "Traceback" not in err
    checkpoints = out / "checkpoints"
    assert not list(checkpoints.glob(".*")), "a staging directory was left behind"
    if (checkpoints / LATEST).exists():
        assert (checkpoints / (checkpoints / LATEST).read_text().strip() / META_FILE).exists()
