"""DRaFT on one GPU at each family's real scale: SD 1.5, SDXL base, SD3.5-medium, FLUX.1-dev.

Builds the family's pipeline at its real geometry (``--family sd15|sdxl|sd3|flux``) and the aesthetic reward at its
real CLIP ViT-L/14 geometry, all with random weights (they cost exactly what the real ones cost), directly on the
GPU, and measures DRaFT-1 (DRaFT-K, K = 1) and DRaFT-LV (n = 2) at the family's native resolution, sampling steps
and guidance (SD 1.5: 512x512, 50 DDIM steps, guidance 7.5; the others 1024x1024 and their published defaults),
bf16, batch 1, each with the no-grad prefix eager, ``torch.compile``d and (DRaFT-1) compiled with CUDA graphs
(``reduce-overhead``): seconds per step, images per second, peak GPU memory and the fraction of the FLOP floor
(``finetune.profiling``'s cost model at the data-sheet peak). Then the largest batch that fits, doubling, with
chunked decode-and-reward (``grad_chunk_size`` 1). Writes a Markdown report headed by the commit it ran on.

    python benchmarks/gpu_families.py --family flux     # report to benchmarks/results/gpu_flux_<card>_<date>.md
    python benchmarks/gpu_families.py --family sdxl --smoke   # the family's tiny pipeline on the CPU (tested)
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

import provenance
import torch
from step_breakdown import describe_device, peak_flops, print_phases

from finetune.config import TrainConfig
from finetune.pipelines import build_random_pipeline
from finetune.profiling import profile_step, step_floor_flops
from finetune.trainer import Trainer
from rewards import get_reward

FAMILIES = {
    "sd15": dict(family="sd", size="sd15", steps=50, guidance=7.5, batches=(8, 16, 32, 64, 128)),
    "sdxl": dict(family="sdxl", size="base", batches=(2, 4, 8, 16, 32)),
    "sd3": dict(family="sd3", size="3.5-medium", batches=(2, 4, 8, 16, 32)),
    "flux": dict(family="flux", size="dev", batches=(2, 4, 8, 16, 32)),
}
"""Each family's real geometry (``build_random_pipeline`` sizes) and the batches tried after batch 1; unset steps
and guidance are the family's published defaults (``TrainConfig``'s ``None``)."""
SMOKE = dict(size="tiny", resolution=64, steps=3, guidance=None, batches=(2,))
"""The smoke run: the family's tiny pipeline and the reward's tiny geometry, on the CPU."""
BATCH, CHUNK = 1, 1
METHODS = {"DRaFT-1": dict(method="draft-k", k=1), "DRaFT-LV": dict(method="draft-lv", lv_n=2)}
PREFIXES = {
    "eager": {},
    "compiled": {"compile_prefix": True},
    "compiled + CUDA graphs": {"compile_prefix": True, "compile_mode": "reduce-overhead"},
}
"""How the no-grad prefix runs; CUDA graphs only on a GPU."""


def build_trainer(setup: dict, device: torch.device, batch: int, **changes: object) -> Trainer:
    """A fresh pipeline, reward and trainer, initialised on ``device`` (fast on a GPU)."""
    config = TrainConfig(
        num_inference_steps=setup.get("steps"),
        guidance_scale=setup.get("guidance"),
        resolution=setup.get("resolution"),
        batch_size=batch,
        mixed_precision="bf16" if device.type == "cuda" else "no",
        device=str(device),
        output_dir=tempfile.mkdtemp(prefix="gpu-families-"),
        **changes,
    )
    with device:
        pipeline = build_random_pipeline(setup["size"], seed=0, family=setup["family"])
        reward = get_reward("aesthetic", pretrained=False, tiny=setup["smoke"])
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
        config = trainer.config
        settings = f"{config.resolution}x{config.resolution}, T = {config.num_inference_steps}, guidance "
        settings += f"{config.guidance_scale:g} ({trainer.family.title})"
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
        "settings": settings,
    }


COLUMNS = ("method", "prefix", "batch", "s/step", "images/s", "peak memory GiB", "fraction of FLOP floor")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=list(FAMILIES))
    parser.add_argument("--smoke", action="store_true", help="the family's tiny pipeline and reward on the CPU")
    parser.add_argument("--prefixes", default=",".join(PREFIXES), help="comma-separated no-grad prefix variants")
    parser.add_argument("--output", help="Markdown report path (default on a GPU: benchmarks/results/...)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--time-budget", type=float, default=400, help="seconds after which no further measurement starts"
    )
    args = parser.parse_args()
    prefixes = args.prefixes.split(",")
    if unknown := sorted(set(prefixes) - set(PREFIXES)):
        parser.error(f"unknown prefix variant(s) {unknown}; choose from {', '.join(PREFIXES)}")
    setup = {**FAMILIES[args.family], **(SMOKE if args.smoke else {}), "smoke": args.smoke}
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    header = provenance.header()
    start = time.perf_counter()
    peak, source = peak_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)  # the step's dtype
    rows, notes = [], []
    # Eager rows first, then compiled ones (compiling a denoiser takes a minute or two), then the batch search;
    # each measurement starts only while the time budget lasts, so the run ends within about 8 minutes.
    plan = [(method, prefix) for prefix in prefixes for method in METHODS if "CUDA" not in prefix]
    if device.type == "cuda" and "compiled + CUDA graphs" in prefixes:
        plan.append(("DRaFT-1", "compiled + CUDA graphs"))
    plan += [("DRaFT-1", batch) for batch in setup["batches"]]
    largest, out_of_memory, settings = BATCH, False, None
    for method, variant in plan:
        if time.perf_counter() - start > args.time_budget:
            notes.append(f"Not measured: {method}, {variant} (time budget {args.time_budget:.0f} s spent).")
            continue
        search = isinstance(variant, int)
        if search and out_of_memory:
            continue  # a smaller batch did not fit
        batch = variant if search else BATCH
        changes = {"grad_chunk_size": CHUNK} if search else PREFIXES[variant]
        print(f"\n[{method}, {'eager' if search else variant} prefix, batch {batch}]")
        try:
            row = measure(setup, device, batch, 1 if search else args.repeats, peak, **changes, **METHODS[method])
        except torch.OutOfMemoryError:
            if not search:
                raise
            notes.append(f"Batch {batch} (chunk {CHUNK}) ran out of memory.")
            out_of_memory = True
            continue
        except Exception as err:  # a compiler failure is a result to report, not a reason to stop
            if search or variant == "eager":
                raise
            notes.append(f"{method} with the {variant} prefix failed: {type(err).__name__}: {str(err)[:300]}")
            continue
        settings = row.pop("settings")
        if search:
            largest = batch
            method = f"{method}, chunk {CHUNK}"
        rows.append({"method": method, "prefix": "eager" if search else variant, "batch": batch, **row})
    if not rows:
        largest = None
    notes.append(f"Largest batch that fitted: {largest} (tried {', '.join(map(str, (BATCH, *setup['batches'])))}).")
    notes.append(f"FLOP floor at {peak / 1e12:.3g} TFLOP/s ({source}).")
    notes.append(f"Total run time {time.perf_counter() - start:.0f} s; {provenance.footer()}.")

    today = datetime.date.today().isoformat()
    lines = [
        f"# DRaFT, {args.family} at {'tiny (smoke)' if args.smoke else 'real'} scale on {describe_device(device)}, "
        f"{today}",
        "",
        header,
        "",
        f"`python benchmarks/gpu_families.py {' '.join(sys.argv[1:])}`: {args.family} pipeline `{setup['size']}` "
        f"(random weights), aesthetic reward ({'tiny' if args.smoke else 'CLIP ViT-L/14'}, random weights), "
        f"{settings or 'not measured'}, {'bf16' if device.type == 'cuda' else 'fp32'}, gradient checkpointing on; "
        f"median of {args.repeats} steps after a warm-up step (which compiles); batch-search rows: one step after a "
        f"warm-up.",
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
        output = f"benchmarks/results/gpu_{args.family}_{card}_{today}.md"
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(report)
        print(f"report written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
