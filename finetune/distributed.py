"""Data parallelism across processes launched by ``torchrun`` or ``accelerate launch`` (same CLI).

Only the LoRA gradients are averaged across ranks (the frozen weights never need it). Every rank holds the same
data generator, draws the global batch and keeps its own rows, so N processes with batch b make exactly the
update of one process with batch N*b. Rank 0 writes every output.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group when launched with several processes; returns ``(rank, world size, device)``."""
    if world_size() == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (a missing gradient counts as zero)."""
    world = world_size()
    if world == 1:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def gather(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a same-length 1-D tensor from every rank (rank order)."""
    if world_size() == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop signal seen by one process)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
