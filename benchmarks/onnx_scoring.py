"""Scoring throughput of the aesthetic reward: torch (fp32, inference mode) vs onnxruntime, on the CPU.

Builds ``aesthetic`` at its real geometry (OpenAI CLIP ViT-L/14 image tower + MLP head) with random weights (the
same cost as the reference weights, no download), exports it with ``rewards.onnx.export_onnx`` and scores one
fixed batch with both backends, alternating them: one warm-up each, then ``--repeats`` timed runs each. Prints the
median images/s of each, their ratio, and the largest absolute difference between the two backends' scores;
exits with status 1 if that difference exceeds ``--tolerance``. Both backends use ``--threads`` intra-op threads;
the load average printed at the start and end tells whether other work shared the CPU.

    python benchmarks/onnx_scoring.py                       # batch 8 at 224x224, 5 repeats, all physical cores
    python benchmarks/onnx_scoring.py --batch 4 --repeats 3 --threads 1
    python benchmarks/onnx_scoring.py --tiny                # 2-layer CLIP, a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import provenance
import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="image side (the export size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per backend, after one warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads, both")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |torch - onnx| score")
    parser.add_argument("--tiny", action="store_true", help="2-layer, 32-wide CLIP tower (smoke test)")
    args = parser.parse_args()

    import onnxruntime

    from rewards import get_reward
    from rewards.onnx import OnnxReward, export_onnx

    print(provenance.header())
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reward = get_reward("aesthetic", pretrained=False, tiny=args.tiny)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    parameters = sum(p.numel() for p in reward.parameters())
    print(
        f"aesthetic reward ({'tiny CLIP' if args.tiny else 'CLIP ViT-L/14'} + MLP head, random weights, "
        f"{parameters / 1e6:.1f}M parameters), batch {args.batch} at {args.size}x{args.size}, fp32, "
        f"{args.repeats} repeats after 1 warm-up"
    )
    print(
        f"machine: {cpu_model()}, {platform.machine()}, threads: {torch.get_num_threads()} of "
        f"{os.cpu_count()} logical CPUs; Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}"
    )
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "aesthetic.onnx"
        export_seconds = seconds(lambda: export_onnx(reward, path, args.size))
        size_mb = sum(f.stat().st_size for f in Path(directory).iterdir()) / 1e6
        onnx_reward = OnnxReward(path, num_threads=args.threads)
        print(f"export: {export_seconds:.1f} s, {size_mb:.0f} MB")

        def torch_scores() -> torch.Tensor:
            with torch.inference_mode():
                return reward(images)

        backends = {"torch": torch_scores, "onnxruntime": lambda: onnx_reward(images)}
        scores = {name: run() for name, run in backends.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(args.repeats):
            for name, run in backends.items():
                times[name].append(seconds(run))

    rate = {name: args.batch / statistics.median(values) for name, values in times.items()}
    for name in backends:
        spread = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"{name:>12}: {rate[name]:8.2f} images/s (median of {args.repeats}; seconds per batch: {spread})")
    difference = (scores["torch"] - scores["onnxruntime"]).abs().max().item()
    print(f"onnxruntime / torch: {rate['onnxruntime'] / rate['torch']:.2f}x")
    print(
        f"max |torch - onnxruntime| score: {difference:.2e} (tolerance {args.tolerance:g}); torch scores range "
        f"{scores['torch'].min().item():.4f} to {scores['torch'].max().item():.4f}"
    )
    print(provenance.footer())
    if difference > args.tolerance:
        print(f"FAIL: the backends differ by more than {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
