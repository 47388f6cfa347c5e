"""Where one training step's time goes: seconds, FLOPs and TFLOP/s per phase, and the distance to the FLOP floor.

For a pipeline (a random SD-architecture one of a named ``--size``, or ``--model`` for real weights, which cost
the same) and settings, each speed variant builds a fresh trainer; after a warm-up step each (which also
compiles), ``--repeats`` rounds time one step of every variant in turn, phase by phase (no-grad sampling, grad
steps forward and backward, VAE decode, reward, optimizer), so a change in the machine's load falls on every
variant alike; medians are reported. Every variant's trainer is held at once: on a small GPU, pass fewer
``--variants``. The first variant's FLOPs are counted per phase with ``FlopCounterMode``. The floor is the cost
model of ``shared/reference/PERFORMANCE.md``: component forward FLOPs (one UNet evaluation, VAE decode, reward
call, counted on this pipeline) times how often the step runs them, forwards of graph-keeping parts twice, at
the device's peak: the data-sheet BF16 peak for known GPUs, else the best rate of a large matmul measured here.

    python benchmarks/step_breakdown.py                              # small pipeline on this machine
    python benchmarks/step_breakdown.py --size sd15 --resolution 512 --steps 50 --batch 8   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import provenance
import torch

from finetune.config import TrainConfig
from finetune.pipelines import PIPELINE_SIZES, build_random_pipeline, load_pipeline
from finetune.profiling import (
    PHASES,
    StepProfile,
    measured_peak_flops,
    profile_steps,
    spec_peak_flops,
    step_floor_flops,
)
from finetune.trainer import Trainer
from rewards import get_reward

VARIANTS = {
    "plain": {},
    "channels-last": {"channels_last": True},
    "eager-attention": {"attention": "eager"},
    "compiled-prefix": {"compile_prefix": True},
    "chunked-1": {"grad_chunk_size": 1},
    "anchored": {"anchor_weight": 0.1},
}
"""TrainConfig changes against the plain path (SDPA attention, contiguous, eager prefix, whole-batch backward):
the speed options, and what chunking (a memory option) and the anchor penalty (one more no-grad denoiser call per
grad step, ``--anchor-weight``) cost in time."""


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The rate the floor is computed at, and where it comes from."""
    spec = spec_peak_flops(device)
    if spec is not None:
        return spec, "data-sheet dense BF16 peak"
    size = 4096 if device.type == "cuda" else 1024
    return measured_peak_flops(device, dtype, size=size), f"best {size}x{size} matmul measured here ({dtype})"


def build(args: argparse.Namespace, config: TrainConfig) -> Trainer:
    """A fresh trainer: same pipeline weights, reward and LoRA initialisation for every variant."""
    pipeline = load_pipeline(args.model) if args.model else build_random_pipeline(args.size, seed=0)
    torch.manual_seed(0)
    reward = get_reward(args.reward, pretrained=False, tiny=args.tiny_reward)
    return Trainer(pipeline, reward, config, prompts=["a photo of a cat", "a red car"], eval_prompts=[])


def make_config(args: argparse.Namespace, **changes: object) -> TrainConfig:
    settings = dict(
        method=args.method,
        k=args.k,
        lv_n=args.lv_n,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        resolution=args.resolution or PIPELINE_SIZES[args.size]["resolution"],
        batch_size=args.batch,
        grad_chunk_size=args.chunk,
        mixed_precision=args.precision,
        device=args.device,
        output_dir=tempfile.mkdtemp(prefix="step-breakdown-"),
    )
    return TrainConfig(**{**settings, **changes})


def print_phases(profile: StepProfile) -> None:
    print(f"{'phase':>24} {'seconds':>9} {'share':>6} {'GFLOP':>10} {'TFLOP/s':>8}")
    for name in [p for p in PHASES if p in profile.seconds]:
        seconds = profile.seconds[name]
        flops = profile.flops.get(name)
        rate = f"{flops / seconds / 1e12:>8.3f}" if flops and seconds > 0 else f"{'-':>8}"
        gflop = f"{flops / 1e9:>10.1f}" if flops is not None else f"{'-':>10}"
        print(f"{name:>24} {seconds:>9.3f} {seconds / profile.step_seconds:>6.1%} {gflop} {rate}")
    other = profile.step_seconds - sum(profile.seconds.values())
    print(f"{'(between phases)':>24} {other:>9.3f} {other / profile.step_seconds:>6.1%}")
    print(f"{'step':>24} {profile.step_seconds:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=list(PIPELINE_SIZES))
    parser.add_argument("--model", help="a diffusers SD 1.x directory or hub id instead of a random pipeline")
    parser.add_argument("--reward", default="aesthetic")
    parser.add_argument(
        "--tiny-reward",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the reward's tiny test geometry (default: tiny unless --size sd15)",
    )
    parser.add_argument("--method", default="draft-k")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--lv-n", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps T")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=None, help="default: the pipeline size's resolution")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=None, help="grad_chunk_size")
    parser.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.tiny_reward is None:
        args.tiny_reward = args.size != "sd15" and not args.model
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")

    device = torch.device(args.device)
    k = make_config(args).effective_k
    print(provenance.header())
    print(
        f"one {args.method} training step (K {k}), pipeline {args.model or args.size}, reward {args.reward}"
        f"{' (tiny)' if args.tiny_reward else ''}, T = {args.steps}, guidance {args.guidance}, batch {args.batch}, "
        f"chunk {args.chunk}, device {describe_device(device)}"
    )
    trainers = {name: build(args, make_config(args, **VARIANTS[name])) for name in variants}
    first = trainers[variants[0]]
    peak, peak_source = peak_flops(device, first.autocast_dtype or torch.float32)
    # The floor depends on the work, not on how it runs: the same for every variant.
    floor = step_floor_flops(first) / peak
    print(f"FLOP floor at {peak / 1e12:.3f} TFLOP/s ({peak_source}): {floor:.3f} s per step")
    start = time.perf_counter()
    # FLOPs are counted op by op in eager mode, once (they do not depend on the variant).
    counted = [variants[0]] if variants[0] != "compiled-prefix" else []
    profiles = profile_steps(trainers, repeats=args.repeats, count=counted)
    print(f"(warmed up, then {args.repeats} rounds of one step per variant, in {time.perf_counter() - start:.0f} s)")
    results: dict[str, dict] = {}
    for name, profile in profiles.items():
        print(f"\n[{name}]")
        print_phases(profile)
        if profile.flops:
            print(
                f"counted {profile.counted_flops / 1e12:.4f} TFLOP (with recomputation), achieved "
                f"{profile.counted_flops / profile.step_seconds / 1e12:.3f} TFLOP/s"
            )
        print(
            f"fraction of the FLOP floor: {floor / profile.step_seconds:.1%} "
            f"(measured {profile.step_seconds:.3f} s vs floor {floor:.3f} s)"
        )
        if profile.peak_memory_bytes is not None:
            print(f"peak memory {profile.peak_memory_bytes / 2**30:.2f} GiB")
        results[name] = {
            "step_seconds": profile.step_seconds,
            "phases": profile.seconds,
            "flops": profile.flops,
            "peak_memory_bytes": profile.peak_memory_bytes,
            "fraction_of_floor": floor / profile.step_seconds,
        }
    baseline = results[variants[0]]["step_seconds"]
    print(f"\n{'variant':>16} {'s/step':>8} {'time vs ' + variants[0]:>22}")
    for name, row in results.items():
        print(f"{name:>16} {row['step_seconds']:>8.3f} {row['step_seconds'] / baseline:>22.2f}")
    print(provenance.footer())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "commit": provenance.commit(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
