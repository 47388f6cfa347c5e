"""Where a training step's time and FLOPs go: per-phase timers, FLOP counts and the FLOP lower bound.

A :class:`PhaseTimer` is shared by the trainer and its sampler; when enabled it synchronises the device around
each phase (so GPU time lands in the right phase) and, given a ``FlopCounterMode``, attributes counted FLOPs to
phases too. Disabled (the default) it costs nothing. The FLOP lower bound of a step follows
``shared/reference/PERFORMANCE.md``: every forward once, plus one backward of about the forward's cost for the
parts that keep the graph (frozen weights need input gradients only), at the device's peak rate.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

NO_GRAD_PHASES = ("no-grad sampling",)
"""Phases that run forward only."""
GRAD_FORWARD_PHASES = ("grad steps forward", "decode", "reward")
"""Forward phases whose graph is kept: the lower bound counts them twice (forward + input-gradient backward)."""
PHASES = (
    "text encoder",
    *NO_GRAD_PHASES,
    "grad steps forward",
    "decode",
    "reward",
    "decode+reward backward",
    "grad steps backward",
    "optimizer",
)
"""Every phase of a training step, in the order they run."""

SPEC_PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312e12,
}
"""Dense BF16 peak FLOP/s by device-name fragment (first match wins; PERFORMANCE.md, NVIDIA data sheets)."""


class PhaseTimer:
    """Accumulates wall time (and FLOPs, with ``flop_counter``) per named phase while ``enabled``."""

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = False) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self.flop_counter: FlopCounterMode | None = None
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds.clear()
        self.flops.clear()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self.synchronize()
        flops = self.flop_counter.get_total_flops() if self.flop_counter is not None else 0
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if self.flop_counter is not None:
                self.flops[name] = self.flops.get(name, 0) + self.flop_counter.get_total_flops() - flops


def count_flops(function: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call (matmuls, convolutions and attention; 1 multiply-add = 2 FLOPs). Works on the meta
    device, so the cost of a full-size model can be counted without computing it."""
    with FlopCounterMode(display=False) as counter:
        function(*args, **kwargs)
    return counter.get_total_flops()


def lower_bound_flops(flops: dict[str, int]) -> int:
    """The minimum work of a step whose phases counted ``flops``: no-grad forwards once, graph-keeping forwards
    twice (their backward needs input gradients only, about one forward), no recomputation, no weight gradients."""
    return sum(flops.get(p, 0) for p in NO_GRAD_PHASES) + 2 * sum(flops.get(p, 0) for p in GRAD_FORWARD_PHASES)


def spec_peak_flops(device: torch.device | str) -> float | None:
    """The data-sheet dense BF16 peak of a known CUDA device, else ``None``."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in SPEC_PEAK_FLOPS.items() if fragment in name), None)


def measured_peak_flops(
    device: torch.device | str, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5
) -> float:
    """FLOP/s of the fastest of ``repeats`` square matmuls of side ``size``: the rate this device reaches on the
    kindest possible work, the ceiling the step is compared with when no data-sheet peak is known."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timer = PhaseTimer(device, enabled=True)
    best = float("inf")
    for _ in range(repeats):
        timer.reset()
        with timer.phase("matmul"):
            a @ b
        best = min(best, timer.seconds["matmul"])
    return 2 * size**3 / best
