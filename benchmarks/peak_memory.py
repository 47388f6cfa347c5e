"""Peak memory of one DRaFT-K training step as K and the batch grow, with and without the memory techniques.

Two sweeps on a random SD-architecture pipeline (``--size``, default ``small``), each configuration in its own
process: K = 1, 10, 50 at batch 1 (per-step gradient checkpointing on and off), and batch 1, 4, 16 at K = 1
(chunked decode-and-reward backward with chunks of one image, and the whole batch at once). On CPU the figure is
the peak resident memory sampled every millisecond during the step, minus the resident memory just before it,
with glibc returning freed tensors to the OS at once (``CHILD_ENV``); on CUDA it is
``torch.cuda.max_memory_allocated`` over the step, minus the memory before.

    python benchmarks/peak_memory.py                  # small pipeline, T = 50, on this machine's device
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

import torch

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


def measure(size: str, steps: int, k: int, batch: int, checkpointing: bool, chunk: int | None, device: str) -> dict:
    """Peak extra memory (bytes) of the second training step of a fresh trainer (the first warms up)."""
    import tempfile

    from finetune.config import TrainConfig
    from finetune.pipelines import PIPELINE_SIZES, build_random_pipeline
    from finetune.trainer import Trainer
    from rewards import get_reward

    config = TrainConfig(
        method="draft-k",
        k=k,
        num_inference_steps=steps,
        resolution=PIPELINE_SIZES[size]["resolution"],
        batch_size=batch,
        gradient_checkpointing=checkpointing,
        grad_chunk_size=chunk,
        steps=2,
        output_dir=tempfile.mkdtemp(),
        device=device,
        mixed_precision="bf16" if device == "cuda" else "no",
    )
    trainer = Trainer(build_random_pipeline(size), get_reward("contrast"), config, prompts=["a cat"], eval_prompts=[])
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
    else:
        release_free_memory()
        before = resident_bytes()
        start = time.perf_counter()
        with PeakSampler() as sampler, saved:
            trainer.train_step()
        seconds = time.perf_counter() - start
        peak = sampler.peak - before
    return {"peak_bytes": peak, "saved_bytes": saved.bytes, "seconds": seconds}


def run_child(args: argparse.Namespace, k: int, batch: int, checkpointing: bool, chunk: int | None) -> dict:
    spec = json.dumps({"k": k, "batch": batch, "checkpointing": checkpointing, "chunk": chunk})
    child = [sys.executable, __file__, "--size", args.size, "--steps", str(args.steps), "--device", args.device]
    out = subprocess.run([*child, "--child", spec], capture_output=True, text=True, check=True, env=CHILD_ENV).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(title: str, rows: list[tuple[str, dict]], baseline: dict) -> None:
    print(f"\n{title}")
    print(f"{'setting':>28} {'peak MiB':>9} {'ratio':>6} {'saved MiB':>9} {'s/step':>7}")
    for label, row in rows:
        ratio = row["peak_bytes"] / baseline["peak_bytes"] if baseline["peak_bytes"] > 0 else float("nan")
        print(
            f"{label:>28} {row['peak_bytes'] / 2**20:>9.1f} {ratio:>6.2f} {row['saved_bytes'] / 2**20:>9.1f} "
            f"{row['seconds']:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "sd15"])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps T")
    parser.add_argument("--ks", default="1,10,50", help="comma-separated K values for the K sweep (at most T)")
    parser.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes for the batch sweep")
    parser.add_argument("--chunk", type=int, default=1, help="grad_chunk_size of the chunked rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(args.size, args.steps, device=args.device, **spec)))
        return

    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    print(
        f"peak memory of one DRaFT-K training step: pipeline '{args.size}', T = {args.steps}, reward contrast, "
        f"device {args.device} ({platform.processor() or platform.machine()}, torch {torch.__version__})"
    )
    for checkpointing in (True, False):
        rows = [
            (f"K={k} checkpointing {'on' if checkpointing else 'off'}", run_child(args, k, 1, checkpointing, None))
            for k in ks
        ]
        print_table(f"K sweep, batch 1, gradient checkpointing {'on' if checkpointing else 'off'}", rows, rows[0][1])
    for chunk in (args.chunk, None):
        rows = [(f"batch {b} chunk {chunk or 'whole batch'}", run_child(args, 1, b, True, chunk)) for b in batches]
        print_table(f"batch sweep, K = 1, checkpointing on, grad_chunk_size {chunk}", rows, rows[0][1])


if __name__ == "__main__":
    main()
