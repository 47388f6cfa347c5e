"""Peak memory of one DRaFT-K training step as K and the batch grow, with and without the memory techniques.

Two sweeps on a random pipeline of a family (``--family sd|sdxl|sd3|flux``, ``--size``: default ``small`` for SD,
``tiny`` for the others), each configuration in its own process: K = 1, 10, 50 at batch 1 (per-step gradient
checkpointing on and off), and batch 1, 4, 16 at K = 1
(chunked decode-and-reward backward with chunks of one image, and the whole batch at once).

On CUDA the figure is ``torch.cuda.max_memory_allocated`` over the step, minus the memory before. On CPU two
figures: *tensor peak*, the most tensor memory live at once during the step (bytes allocated minus bytes freed,
from the profiler's allocation events: the CPU counterpart of the CUDA figure), and *RSS peak*, the resident
memory sampled every millisecond during another step, minus the resident memory just before it, with glibc
returning freed tensors to the OS at once (``CHILD_ENV``). RSS also counts what is not tensor data: the autograd
graph's nodes (about 1 MiB per checkpointed UNet call of the small pipeline, host memory even on a GPU) and heap
fragmentation.

    python benchmarks/peak_memory.py                  # small pipeline, T = 50, on this machine's device
    python benchmarks/peak_memory.py --family flux    # the tiny FLUX.1-dev-style pipeline (flow matching)
    python benchmarks/peak_memory.py --size sd15 --steps 50 --batches 1,4,16   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import provenance
import torch

from finetune.pipelines import BUILDERS, build_random_pipeline

CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc serves allocations of 64 KiB and more with mmap, so freed tensors leave the resident set at once and the
resident size tracks live tensor memory (step times are slower than usual because of it)."""

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def release_free_memory() -> None:
    """Collect garbage and return the allocator's free pages to the OS (glibc), so that the next step's peak is
    not hidden by memory the previous step freed but the process kept."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakSampler:
    """Samples resident memory every millisecond in a background thread; ``peak`` is the maximum seen."""

    def __init__(self) -> None:
        self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def peak_tensor_bytes(step: Callable[[], object]) -> int:
    """The most tensor memory live at once during ``step()``, relative to its start: the running sum of the
    profiler's CPU allocation and free events (``kineto_results`` is the profiler's raw event list)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of distinct storages autograd saves for backward (the graph's activation memory)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor


def measure(
    family: str, size: str, steps: int, k: int, batch: int, checkpointing: bool, chunk: int | None, device: str
) -> dict:
    """Peak extra memory (bytes) of the second training step of a fresh trainer (the first warms up)."""
    import tempfile

    from finetune.config import TrainConfig
    from finetune.trainer import Trainer
    from rewards import get_reward

    config = TrainConfig(
        method="draft-k",
        k=k,
        num_inference_steps=steps,
        resolution=BUILDERS[family][0][size]["resolution"],
        batch_size=batch,
        gradient_checkpointing=checkpointing,
        grad_chunk_size=chunk,
        steps=2,
        output_dir=tempfile.mkdtemp(),
        device=device,
        mixed_precision="bf16" if device == "cuda" else "no",
    )
    trainer = Trainer(
        build_random_pipeline(size, family=family), get_reward("contrast"), config, prompts=["a cat"], eval_prompts=[]
    )
    trainer.train_step()
    saved = SavedTensors()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with saved:
            trainer.train_step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before
        rss_peak = None
    else:
        release_free_memory()
        before = resident_bytes()
        start = time.perf_counter()
        with PeakSampler() as sampler, saved:
            trainer.train_step()
        seconds = time.perf_counter() - start
        rss_peak = sampler.peak - before
        peak = peak_tensor_bytes(trainer.train_step)
    return {"peak_bytes": peak, "rss_peak_bytes": rss_peak, "saved_bytes": saved.bytes, "seconds": seconds}


def run_child(args: argparse.Namespace, k: int, batch: int, checkpointing: bool, chunk: int | None) -> dict:
    spec = json.dumps({"k": k, "batch": batch, "checkpointing": checkpointing, "chunk": chunk})
    child = [
        sys.executable,
        __file__,
        "--family",
        args.family,
        "--size",
        args.size,
        "--steps",
        str(args.steps),
        "--device",
        args.device,
    ]
    out = subprocess.run([*child, "--child", spec], capture_output=True, text=True, check=True, env=CHILD_ENV).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(title: str, rows: list[tuple[str, dict]]) -> None:
    """Peaks in MiB and as ratios to the first row."""
    print(f"\n{title}")
    first = rows[0][1]
    header = f"{'setting':>28} {'tensor MiB':>10} {'ratio':>6}"
    if first["rss_peak_bytes"] is not None:
        header += f" {'RSS MiB':>8} {'ratio':>6}"
    print(header + f" {'saved MiB':>9} {'s/step':>7}")
    for label, row in rows:
        line = f"{label:>28} {row['peak_bytes'] / 2**20:>10.1f} {row['peak_bytes'] / first['peak_bytes']:>6.2f}"
        if row["rss_peak_bytes"] is not None:
            line += f" {row['rss_peak_bytes'] / 2**20:>8.1f} {row['rss_peak_bytes'] / first['rss_peak_bytes']:>6.2f}"
        print(line + f" {row['saved_bytes'] / 2**20:>9.1f} {row['seconds']:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd", choices=list(BUILDERS))
    parser.add_argument("--size", default=None, help="default: SD small, else tiny")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps T")
    parser.add_argument("--ks", default="1,10,50", help="comma-separated K values for the K sweep (at most T)")
    parser.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes for the batch sweep")
    parser.add_argument("--chunk", type=int, default=1, help="grad_chunk_size of the chunked rows")
    parser.add_argument("--sweeps", default="k,batch", help="which sweeps to run: k, batch or both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = BUILDERS[args.family][0]
    args.size = args.size or ("small" if args.family == "sd" else "tiny")
    if args.size not in sizes:
        parser.error(f"no random {args.family} pipeline of size {args.size!r}; choose from {', '.join(sizes)}")

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(args.family, args.size, args.steps, device=args.device, **spec)))
        return

    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    print(provenance.header())
    print(
        f"peak memory of one DRaFT-K training step: {args.family} pipeline '{args.size}', T = {args.steps}, reward "
        f"contrast, device {args.device} ({platform.processor() or platform.machine()}, torch {torch.__version__})"
    )
    sweeps = set(args.sweeps.split(","))
    if not sweeps <= {"k", "batch"}:
        parser.error(f"--sweeps {args.sweeps!r}: choose k, batch or k,batch")
    for checkpointing in (True, False) if "k" in sweeps else ():
        rows = [
            (f"K={k} checkpointing {'on' if checkpointing else 'off'}", run_child(args, k, 1, checkpointing, None))
            for k in ks
        ]
        print_table(f"K sweep, batch 1, gradient checkpointing {'on' if checkpointing else 'off'}", rows)
    for chunk in (args.chunk, None) if "batch" in sweeps else ():
        rows = [(f"batch {b} chunk {chunk or 'whole batch'}", run_child(args, 1, b, True, chunk)) for b in batches]
        print_table(f"batch sweep, K = 1, checkpointing on, grad_chunk_size {chunk}", rows)
    print(provenance.footer())


if __name__ == "__main__":
    main()
