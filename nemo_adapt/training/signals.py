"""Preemption: Slurm sends SIGTERM on preemption and the `--signal` of the job (SIGUSR1 in our
launch scripts) before the time limit. Either asks the trainer to checkpoint at the next step
boundary and exit with EXIT_REQUEUE, so the job can be requeued and resumed."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_REQUEUE = 75
"""Exit status after a checkpoint written on a signal (EX_TEMPFAIL: try again later)."""


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

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
