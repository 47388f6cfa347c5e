"""DRaFT on one GPU at Stable Diffusion 1.5 scale, in one run of under 8 minutes on an H100 or H200.

Builds the SD 1.5-architecture pipeline and the aesthetic reward at its real CLIP ViT-L/14 geometry, both with
random weights (they cost exactly what the real ones cost), directly on the GPU, and measures DRaFT-1 (DRaFT-K,
K = 1) and DRaFT-LV (n = 2) at 512x512, T = 50 DDIM steps, guidance 7.5, bf16, batch 8, each with the no-grad
prefix eager, ``torch.compile``d, and compiled with CUDA graphs (``reduce-overhead``): seconds per step, images
per second, peak GPU memory and the fraction of the FLOP floor (``benchmarks/step_breakdown.py``'s cost model at
the data-sheet peak). Then the largest batch that fits, doubling from 16 with chunked decode-and-reward
(``grad_chunk_size`` 8). Writes a Markdown report.

    python benchmarks/gpu_sd15.py                 # on a GPU: report to benchmarks/results/gpu_sd15_<card>_<date>.md
    python benchmarks/gpu_sd15.py --smoke         # tiny pipeline and reward on the CPU in seconds (tested)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from step_breakdown import describe_device, peak_flops, print_phases

from finetune.config import TrainConfig
from finetune.pipelines import build_random_pipeline
from finetune.profiling import profile_step, step_floor_flops
from finetune.trainer import Trainer
from rewards import get_reward

FULL = dict(size="sd15", resolution=512, steps=50, batch=8, tiny_reward=False, batches=(16, 32, 64, 128), chunk=8)
SMOKE = dict(size="tiny", resolution=64, steps=3, batch=2, tiny_reward=True, batches=(4,), chunk=2)
METHODS = {"DRaFT-1": dict(method="draft-k", k=1), "DRaFT-LV": dict(method="draft-lv", lv_n=2)}
PREFIXES = {
    "eager": {},
    "compiled": {"compile_prefix": True},
    "compiled + CUDA graphs": {"compile_prefix": True, "compile_mode": "reduce-overhead"},
}
"""How the no-grad prefix runs; CUDA graphs only on a GPU."""


def build_trainer(setup: dict, device: torch.device, batch: int, **changes: object) -> Trainer:
    """A fresh pipeline, reward and trainer, initialised on ``device`` (fast for SD 1.5 on a GPU)."""
    config = TrainConfig(
        num_inference_steps=setup["steps"],
        guidance_scale=7.5,
        resolution=setup["resolution"],
        batch_size=batch,
        mixed_precision="bf16" if device.type == "cuda" else "no",
        device=str(device),
        output_dir=tempfile.mkdtemp(prefix="gpu-sd15-"),
        **changes,
    )
    with device:
        pipeline = build_random_pipeline(setup["size"], seed=0)
        reward = get_reward("aesthetic", pretrained=False, tiny=setup["tiny_reward"])
    return Trainer(pipeline, reward, config, prompts=["a photo of a cat", "a red car"], eval_prompts=[])


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(setup: dict, device: torch.device, batch: int, repeats: int, peak: float, **changes: object) -> dict:
    """Seconds per step, images per second, peak memory and fraction of the FLOP floor (at ``peak`` FLOP/s) of one
    configuration; the trainer is released whether or not it ran."""
    trainer = None
    try:
        trainer = build_trainer(setup, device, batch, **changes)
        floor = step_floor_flops(trainer) / peak
        profile = profile_step(trainer, repeats=repeats, count=False)
    finally:
        trainer = None
        release(device)
    print_phases(profile)
    memory = profile.peak_memory_bytes
    return {
        "s/step": f"{profile.step_seconds:.3f}",
        "images/s": f"{batch / profile.step_seconds:.2f}",
        "peak memory GiB": f"{memory / 2**30:.2f}" if memory is not None else "-",
        "fraction of FLOP floor": f"{floor / profile.step_seconds:.1%}",
    }


COLUMNS = ("method", "prefix", "batch", "s/step", "images/s", "peak memory GiB", "fraction of FLOP floor")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny pipeline and reward on the CPU")
    parser.add_argument("--output", help="Markdown report path (default on a GPU: benchmarks/results/...)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--time-budget", type=float, default=400, help="seconds after which no further measurement starts"
    )
    args = parser.parse_args()
    setup = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    start = time.perf_counter()
    peak, source = peak_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)  # the step's dtype
    rows, notes = [], []
    # Eager rows first, then compiled ones (compiling SD 1.5's UNet takes a minute or two), then the batch search;
    # each measurement starts only while the time budget lasts, so the run ends within about 8 minutes.
    plan = [(method, prefix) for prefix in PREFIXES for method in METHODS if "CUDA" not in prefix]
    if device.type == "cuda":
        plan.append(("DRaFT-1", "compiled + CUDA graphs"))
    plan += [("DRaFT-1", batch) for batch in setup["batches"]]
    largest, out_of_memory = None, False
    for method, variant in plan:
        if time.perf_counter() - start > args.time_budget:
            notes.append(f"Not measured: {method}, {variant} (time budget {args.time_budget:.0f} s spent).")
            continue
        search = isinstance(variant, int)
        if search and out_of_memory:
            continue  # a smaller batch did not fit
        batch = variant if search else setup["batch"]
        changes = {"grad_chunk_size": setup["chunk"]} if search else PREFIXES[variant]
        print(f"\n[{method}, {'eager' if search else variant} prefix, batch {batch}]")
        try:
            row = measure(setup, device, batch, 1 if search else args.repeats, peak, **changes, **METHODS[method])
        except torch.OutOfMemoryError:
            if not search:
                raise
            notes.append(f"Batch {batch} (chunk {setup['chunk']}) ran out of memory.")
            out_of_memory = True
            continue
        except Exception as err:  # a compiler failure is a result to report, not a reason to stop
            if search or variant == "eager":
                raise
            notes.append(f"{method} with the {variant} prefix failed: {type(err).__name__}: {str(err)[:300]}")
            continue
        if search:
            largest = batch
            method = f"{method}, chunk {setup['chunk']}"
        rows.append({"method": method, "prefix": "eager" if search else variant, "batch": batch, **row})
    notes.append(f"Largest batch that fitted: {largest} (tried {', '.join(map(str, setup['batches']))}).")
    notes.append(f"FLOP floor at {peak / 1e12:.3g} TFLOP/s ({source}).")
    notes.append(f"Total run time {time.perf_counter() - start:.0f} s.")

    today = datetime.date.today().isoformat()
    lines = [
        f"# DRaFT at SD 1.5 scale on {describe_device(device)}, {today}",
        "",
        f"`python benchmarks/gpu_sd15.py {' '.join(sys.argv[1:])}`: pipeline `{setup['size']}` (random weights), "
        f"aesthetic reward ({'tiny' if setup['tiny_reward'] else 'CLIP ViT-L/14'}, random weights), "
        f"{setup['resolution']}x{setup['resolution']}, T = {setup['steps']} DDIM, guidance 7.5, "
        f"{'bf16' if device.type == 'cuda' else 'fp32'}, gradient checkpointing on; median of {args.repeats} steps "
        f"after a warm-up step (which compiles); batch-search rows: one step after a warm-up.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows),
        "",
        *notes,
    ]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    output = args.output
    if output is None and not args.smoke:
        card = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-").lower()
        output = f"benchmarks/results/gpu_sd15_{card}_{today}.md"
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(report)
        print(f"report written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
