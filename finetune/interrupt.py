"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM (what Slurm and other schedulers send before a kill).

The first signal only sets a flag: the training loop finishes the step it is in, writes a checkpoint and raises
:class:`TrainingInterrupted`, which the CLI turns into a message with the ``--resume`` command and the conventional
exit status (128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM). A second signal raises
``KeyboardInterrupt`` at once; every file the trainer writes is atomic, so that cannot leave a torn one.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped at a signal after ``step``; ``checkpoint`` is the checkpoint to resume from (or None)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no step had finished)"
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """Context manager: while active, the first SIGINT or SIGTERM sets ``received`` instead of interrupting.

    Handlers are installed only in the main thread (where Python delivers signals); elsewhere it does nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
            f"(Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )
