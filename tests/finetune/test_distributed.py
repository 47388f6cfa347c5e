"""Data parallel with two CPU processes (torchrun, gloo): DDP makes one process's update with the same global batch
(also with gradient accumulation; anchor penalty included), sharded evaluation gives one process's metrics and
grids, and a rank that raises ends every rank with its message."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

LAUNCHER = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval=0.1"]


ANCHOR_WEIGHT = 1.0
"""Every run is anchored to the base model, so the equalities cover the anchor penalty's gradient under DDP too. At
this weight the penalty moves the second step's LoRA by up to 0.017 (measured against a run without it), 170x the
LoRA tolerance: dropping it on one side fails the test."""
LORA_ATOL = 1e-4
"""The anchor's gradient partly cancels the reward's on some entries, and AdamW's step on a near-zero gradient
amplifies the all-reduce's rounding: measured 2e-5 at most (5e-7 without the anchor)."""


def run_training(tiny_model_dir, output_dir, processes, batch_size, grad_accum=1):
    eval_prompts = output_dir.parent / "eval.txt"  # 3 prompts x 2 seeds: 3 images per rank
    eval_prompts.write_text("a cat\na red car\na bowl of fruit\n")
    launcher = [*LAUNCHER, f"--nproc_per_node={processes}", "-m"] if processes > 1 else [sys.executable, "-m"]
    command = [
        *launcher,
        "finetune", "train", "--model", str(tiny_model_dir), "--reward", "contrast", "--method", "draft-lv",
        "--steps", "2", "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--resolution", "64",
        "--num-inference-steps", "3", "--guidance-scale", "3", "--lr", "0.01", "--output-dir", str(output_dir),
        "--device", "cpu", "--eval-every", "100", "--eval-prompts", str(eval_prompts),
        "--anchor-weight", str(ANCHOR_WEIGHT),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    grids = {}
    for step in (0, 2):
        with Image.open(output_dir / "samples" / f"step_{step:06d}.png") as grid:
            grids[step] = np.asarray(grid.convert("RGB"), dtype=np.int16)
    return load_file(str(output_dir / "pytorch_lora_weights.safetensors")), metrics, grids


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    single, single_metrics, single_grids = run_training(tiny_model_dir, tmp_path / "one", 1, batch_size=4)
    runs = {
        "DDP": run_training(tiny_model_dir, tmp_path / "two", 2, batch_size=2),
        "DDP with gradient accumulation (no_sync)": run_training(tiny_model_dir, tmp_path / "acc", 2, 1, 2),
    }
    # The LoRA up factors start at zero: a non-zero value shows the two steps really updated them. The anchor
    # penalty is zero at step 1 (the LoRA is the base model) and pulls on step 2.
    assert max(v.abs().max().item() for k, v in single.items() if "lora.up" in k) > 1e-3
    assert single_metrics[1]["anchor"] == 0.0 and single_metrics[2]["anchor"] > 0
    for what, (lora, metrics, grids) in runs.items():
        assert lora.keys() == single.keys() and single, what
        for key in single:
            torch.testing.assert_close(lora[key], single[key], rtol=0, atol=LORA_ATOL, msg=f"{what}: {key}")
        for ours, theirs in zip(metrics, single_metrics, strict=True):
            for key in ("reward", "loss", "anchor", "eval_reward", "eval_reward_std", "images_seen"):
                assert (key in ours) == (key in theirs), (what, key)
                if key in ours:
                    assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (what, key)
        # Sharded evaluation over two ranks: one process's grids, to a level in 255.
        for step, grid in grids.items():
            assert grid.shape == single_grids[step].shape
            assert np.abs(grid - single_grids[step]).max() <= 1, (what, step)


FAILING = """
import os, sys, time
import torch
from finetune.config import TrainConfig
from finetune.pipelines import load_pipeline
from finetune.trainer import Trainer


class FailingOnRank1:
    calls = 0

    def __call__(self, images, prompts):
        if images.requires_grad:
            self.calls += 1
            if os.environ["RANK"] == "1" and self.calls == 2:
                with open(sys.argv[2] + ".failed_at", "w") as file:
                    file.write(repr(time.time()))
                raise RuntimeError("the reward exploded on rank 1 at step 2")
        return images.mean(dim=(1, 2, 3))


class FailingToMoveOnRank1(torch.nn.Module):
    # Fails while the trainer sets up (moving the reward to the device), before DDP's first collective.

    def to(self, *args, **kwargs):
        if os.environ["RANK"] == "1":
            with open(sys.argv[2] + ".failed_at", "w") as file:
                file.write(repr(time.time()))
            raise RuntimeError("the reward could not be moved on rank 1")
        return self

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


config = TrainConfig(
    resolution=64, num_inference_steps=2, guidance_scale=3.0, batch_size=1, steps=4, eval_every=100,
    eval_seeds=(0,), output_dir=sys.argv[2], device="cpu",
)
reward = {"step": FailingOnRank1, "set-up": FailingToMoveOnRank1}[sys.argv[3]]()
Trainer(load_pipeline(sys.argv[1]), reward, config, eval_prompts=["a cat"]).train()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("step", "RuntimeError: the reward exploded on rank 1 at step 2"),
        ("set-up", "RuntimeError: the reward could not be moved on rank 1"),
    ],
)
def test_a_failing_rank_ends_every_rank_with_its_message(tiny_model_dir, tmp_path, when, message):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    out = tmp_path / "run"
    command = [*LAUNCHER, "--nproc_per_node=2", str(script), str(tiny_model_dir), str(out), when]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    ended = time.time()
    assert result.returncode != 0
    failed_at = float((tmp_path / "run.failed_at").read_text())
    assert ended - failed_at < 15, f"the run took {ended - failed_at:.1f} s to end after rank 1 raised"
    output = result.stdout + result.stderr
    assert message in output  # rank 1's own traceback
    # Rank 0 (waiting for rank 1 in a collective: DDP's set-up or the gradient all-reduce) ends with rank 1's
    # message, from the watchdog.
    assert f"error: rank 1 failed: {message} (ending rank 0)" in output
