"""Data parallel: two CPU processes (torchrun, gloo) make the same LoRA update as one with the same global batch."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def run_training(tiny_model_dir, output_dir, batch_size, processes):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
    command = [
        *(launcher if processes > 1 else [sys.executable, "-m"]),
        "finetune", "train", "--model", str(tiny_model_dir), "--reward", "contrast", "--method", "draft-lv",
        "--steps", "2", "--batch-size", str(batch_size), "--resolution", "64", "--num-inference-steps", "3",
        "--guidance-scale", "3", "--lr", "0.01", "--output-dir", str(output_dir), "--device", "cpu",
        "--eval-every", "100",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(output_dir / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    single = run_training(tiny_model_dir, tmp_path / "one", batch_size=2, processes=1)
    double = run_training(tiny_model_dir, tmp_path / "two", batch_size=1, processes=2)
    assert single.keys() == double.keys() and single
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=0, atol=1e-5)
    # The LoRA up factors start at zero: a non-zero value shows the two steps really updated them.
    assert max(v.abs().max().item() for k, v in single.items() if "lora.up" in k) > 1e-3
