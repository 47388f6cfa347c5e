"""Data parallelism across processes launched by ``torchrun`` or ``accelerate launch`` (same CLI).

PyTorch's ``DistributedDataParallel`` averages the LoRA gradients (bucketed, each bucket's all-reduce overlapped
with the rest of the backward pass; the frozen weights are left out of it). Every rank holds the same data
generator, draws the step's global batch and keeps its own rows, so N processes with batch b make exactly the
update of one process with batch N*b. Evaluation is sharded over the ranks; rank 0 writes every output.

A rank that raises publishes its error in the process group's store; a watchdog thread on every rank polls it and
ends its process with that message, so one rank's failure ends the run on every rank within about a second
instead of leaving the others waiting in a collective until the process-group timeout. The two sides wait for each
other briefly (each wait bounded): the failing rank stays alive until every other rank has printed the message
(its exit would break their collectives, which can abort them before they print), and the others end only once the
failing rank has printed its own traceback (their exit makes the launcher terminate it).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

ERROR_KEY = "finetune/error"
SEEN_KEY = "finetune/error-seen"
"""How many other ranks have printed the published error."""
REPORTED_KEY = "finetune/error-reported"
"""Set by the failing rank once its traceback is out (at interpreter exit)."""
POLL_SECONDS = 0.2
HANDSHAKE_SECONDS = 5.0
"""Longest either side waits for the other (a rank that died or hangs does not hold the run up for longer)."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group when launched with several processes (gloo on CPU, NCCL on CUDA) and start the
    failure watchdog; returns ``(rank, world size, device)``."""
    if world_size() == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _Watchdog.start()
    return dist.get_rank(), dist.get_world_size(), device


def teardown() -> None:
    """Leave the process group at the end of a finished run (every rank gets here): a barrier, so that no rank
    closes the store while another still uses it, then ``destroy_process_group`` (left open, gloo's threads can
    abort the interpreter's exit)."""
    if dist.is_initialized():
        _Watchdog.stop()
        dist.barrier()
        dist.destroy_process_group()


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` wrapped in DDP over its trainable parameters (itself in a single process).

    Frozen parameters and buffers are left out (no start-up broadcast of the base model, no buffer sync).
    ``find_unused_parameters`` lets a configuration leave some adapter out of a step's graph.
    """
    if world_size() == 1:
        return module
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, frozen + [name for name, _ in module.named_buffers()]
    )
    return DistributedDataParallel(module, device_ids=None, find_unused_parameters=True)


def no_sync(module: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` when ``skip`` (a gradient-accumulation micro-batch before the last), else nothing."""
    return module.no_sync() if skip and isinstance(module, DistributedDataParallel) else contextlib.nullcontext()


def gather(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a same-length 1-D tensor from every rank (rank order)."""
    if world_size() == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable; lengths may differ), in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, value)
    return parts


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop signal seen by one process)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Publish an exception raised inside (except a stop on a signal, which the ranks agree on) so that every
    other rank's watchdog ends that rank with this rank's message; then re-raise it here."""
    from finetune.interrupt import TrainingInterrupted

    try:
        yield
    except TrainingInterrupted:
        raise
    except BaseException as err:
        if dist.is_initialized() and _Watchdog.store is not None:
            message = "".join(traceback.format_exception_only(err)).strip()
            with contextlib.suppress(Exception):  # the first failure is the one reported
                _Watchdog.store.compare_set(ERROR_KEY, "", f"{dist.get_rank()}\n{message}")
            atexit.register(_Watchdog.signal, REPORTED_KEY)  # runs after the interpreter has printed the traceback
            _Watchdog.wait_for(lambda store: store.add(SEEN_KEY, 0) >= dist.get_world_size() - 1)
        raise


class _Watchdog:
    """A daemon thread polling the store for another rank's published error; it prints it and exits."""

    store: dist.Store | None = None
    thread: threading.Thread | None = None
    stopping = threading.Event()

    @classmethod
    def start(cls) -> None:
        if cls.thread is not None:
            return
        # The default group's store; a fresh key per torchrun restart (the agent's store outlives its workers).
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        cls.store = dist.PrefixStore(f"restart{restart}/", dist.distributed_c10d._get_default_store())
        cls.thread = threading.Thread(target=cls._poll, args=(dist.get_rank(),), name="finetune-watchdog", daemon=True)
        cls.thread.start()

    @classmethod
    def stop(cls) -> None:
        """End the thread (before the process group goes), so that no poll of the store is under way at exit."""
        if cls.thread is not None:
            cls.stopping.set()
            cls.thread.join()
            cls.thread = cls.store = None
            cls.stopping.clear()

    @classmethod
    def _poll(cls, rank: int) -> None:
        while not cls.stopping.wait(POLL_SECONDS):
            try:
                if not cls.store.check([ERROR_KEY]):
                    continue
                source, _, message = cls.store.get(ERROR_KEY).decode().partition("\n")
            except Exception:  # the store is gone (its host ended): the collectives will fail on their own
                return
            if int(source) == rank:
                return  # this rank's own error: it is being raised in the main thread
            print(f"error: rank {source} failed: {message} (ending rank {rank})", file=sys.stderr, flush=True)
            cls.signal(SEEN_KEY)
            cls.wait_for(lambda store: store.check([REPORTED_KEY]))
            os._exit(1)

    @classmethod
    def signal(cls, key: str) -> None:
        """Count ``key`` up in the store (nothing if the store is gone)."""
        with contextlib.suppress(Exception):
            cls.store.add(key, 1)

    @classmethod
    def wait_for(cls, condition: Callable[[dist.Store], bool]) -> None:
        """Poll ``condition(store)`` until it holds, the store is gone or :data:`HANDSHAKE_SECONDS` have passed."""
        deadline = time.monotonic() + HANDSHAKE_SECONDS
        while time.monotonic() < deadline:
            try:
                if condition(cls.store):
                    return
            except Exception:
                return
            time.sleep(0.01)
