"""Preemption: Slurm sends SIGTERM on preemption and the `--signal` of the job (SIGUSR1 in our
launch scripts) before the time limit. Either asks the trainer to checkpoint at the next step
boundary and exit with EXIT_REQUEUE, so the job can be requeued and resumed.

Before training there is no step boundary and nothing to checkpoint: during data preparation
(`PreemptionHandler.interrupt_on_signal`) SIGTERM and SIGINT raise `RunInterrupted` at once, which
the trainer reports in one line and turns into exit status 128 + the signal number.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

EXIT_REQUEUE = 75
"""Exit status after a checkpoint written on a signal (EX_TEMPFAIL: try again later)."""

INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals that end a phase with nothing to checkpoint (SIGUSR1, a time-limit warning, only sets the flag)."""


class RunInterrupted(BaseException):
    """A signal ended a phase of the run that has nothing to checkpoint (e.g. data preparation).

    A BaseException, like KeyboardInterrupt, so that an `except Exception` on the way (a cache read
    that treats errors as a miss) cannot swallow it.

    Attributes:
        signal_name: e.g. `SIGTERM`.
        phase: what was interrupted, e.g. `data preparation`.
        exit_code: 128 + the signal number, the shell's status for a process ended by that signal.
    """

    def __init__(self, signal_name: str, phase: str):
        self.signal_name = signal_name
        self.phase = phase
        self.exit_code = 128 + int(signal.Signals[signal_name])
        super().__init__(f"{signal_name} received during {phase}; stopped before training, nothing was "
                         f"trained or saved (exit status {self.exit_code})")


class PreemptionHandler:
    """Records SIGTERM/SIGUSR1; `requested()` is a collective so every rank stops at the same step."""

    def __init__(self, enabled: bool = True):
        self._flag = False
        self.signal_name: str | None = None
        self._previous = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # Only set a flag: checkpointing inside a signal handler could interleave with collectives.
        self._flag = True
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        """True on every rank once any rank got a signal (all ranks must call it at each step)."""
        t = torch.tensor([1 if self._flag else 0], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @contextmanager
    def interrupt_on_signal(self, phase: str) -> Iterator[None]:
        """While the block runs, SIGTERM and SIGINT raise `RunInterrupted` instead of waiting for a step.

        Installed whether or not checkpoint-on-signal is enabled; the handlers in place before (this
        handler's, Python's KeyboardInterrupt, or the default) are restored when the block ends. A
        SIGTERM that arrived before the block (recorded as a preemption request) raises on entry.

        Args:
            phase: what the block does, for the message (e.g. `data preparation`).

        Raises:
            RunInterrupted: SIGTERM or SIGINT arrived before or during the block.
        """
        if self._flag and self.signal_name in {s.name for s in INTERRUPTING_SIGNALS}:
            raise RunInterrupted(self.signal_name, phase)

        received: list[str] = []

        def interrupt(signum, frame):
            received.append(signal.Signals(signum).name)
            raise RunInterrupted(received[-1], phase)

        previous = {sig: signal.signal(sig, interrupt) for sig in INTERRUPTING_SIGNALS}
        try:
            yield
        except Exception as err:
            # Under torchrun every rank gets the signal; a rank blocked in a collective (waiting at a
            # barrier for rank 0's data) sees it fail when a peer stops first. After a signal, that
            # failure is the interruption, not a fault of its own.
            if received:
                raise RunInterrupted(received[0], phase) from err
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def restore(self) -> None:
        """Put back the signal handlers that were in place before this one was installed."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
