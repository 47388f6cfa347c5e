"""A per-phase wall-clock timer for the training step, shared by the trainer and its sampler.

When enabled it synchronises the device around each phase (so GPU time lands in the right phase) and, given a
``FlopCounterMode``, attributes counted FLOPs to phases too. Disabled (the default) it costs nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode


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
