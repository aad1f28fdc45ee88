"""Preemption: SIGTERM becomes a flag that all ranks agree on at a step boundary.

Kubernetes sends SIGTERM to the pod; torchrun forwards it to every worker and
SIGKILLs them 30 s later. The handler only sets a flag. At every step boundary
the ranks take the maximum of their flags (and of rank 0's "a timed save is
due") over a small gloo group on the CPU, so one preempted node makes every
rank save at the same step, and a GPU job never syncs with the host for it.
After the save the process exits with 143 (128 + SIGTERM), which the
PyTorchJob restart policies treat as retryable.
"""

import logging
import signal
import types

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143


class Preempted(Exception):
    """Training stopped after a preemption checkpoint; exit with EXIT_PREEMPTED."""


class StepAgreement:
    """Collects SIGTERM and lets all ranks agree on what to do at a step boundary."""

    def __init__(self):
        self.requested = False
        self._group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo")
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: types.FrameType | None) -> None:
        if not self.requested:
            log.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self.requested = True

    def agree(self, save_due: bool) -> tuple[bool, bool]:
        """(stop, save) as decided by all ranks: stop if any rank was signalled."""
        flags = torch.tensor([int(self.requested), int(save_due)], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        stop, save = bool(flags[0]), bool(flags[1])
        self.requested = self.requested or stop
        return stop, save or stop

    @property
    def group(self):
        return self._group

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
