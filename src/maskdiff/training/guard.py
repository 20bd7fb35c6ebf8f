"""What keeps a bad step or a Ctrl-C from reaching a checkpoint.

* :class:`NonFiniteGuard`: a step whose loss or gradient norm is not finite is skipped (no
  optimiser or EMA update), counted and logged; ``train.max_nonfinite_steps`` of them in a row stop
  the run with :class:`TrainingDiverged`. The bookkeeping lives on the device; the host reads it
  only at the logging interval, before a save and at the end (:meth:`NonFiniteGuard.check`), so
  a CUDA run does not wait for the device every step. Whether the *update* can be skipped
  without the host knowing depends on the optimiser: fused AdamW takes the flag on the device
  (``found_inf``, as with a gradient scaler); any other optimiser reads it per step.
* :func:`all_finite`: the tensors a checkpoint or ``pretrained/`` would hold are checked before
  anything is written.
* :class:`StopRequest`: the first Ctrl-C (SIGINT) asks the loop to stop after the current step,
  save, and raise :class:`TrainingInterrupted`; a second one interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "TrainingDiverged",
    "TrainingInterrupted",
    "NonFiniteGuard",
    "all_finite",
    "StopRequest",
    "DEFAULT_MAX_NONFINITE_STEPS",
    "max_nonfinite_steps",
]

DEFAULT_MAX_NONFINITE_STEPS = 10


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stayed non-finite: the work failed (exit code 1). Nothing
    non-finite was written; the run's earlier checkpoints are kept."""

    exit_code = 1


class TrainingInterrupted(RuntimeError):
    """Training was stopped by Ctrl-C (exit code 130); the message says which step to resume from."""

    exit_code = 130


def max_nonfinite_steps(train_config: Any) -> int:
    """``train.max_nonfinite_steps`` (default 10), checked: a positive integer."""
    value = getattr(train_config, "max_nonfinite_steps", DEFAULT_MAX_NONFINITE_STEPS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.max_nonfinite_steps must be a positive integer (steps in a row with a non-finite "
                         f"loss or gradient before training stops), got {value!r}")
    return value


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard (DTensor): this process's part


@torch.no_grad()
def all_finite(tensors: Iterable[Any], *, device: torch.device | None = None, reduce: bool = False) -> bool:
    """Whether every floating-point tensor in ``tensors`` is finite (one host sync).

    ``tensors`` may hold tensors, dicts and lists of them (an optimiser state), on several devices
    (``device``: where the flags are gathered; give the process group's device with ``reduce``).
    With ``reduce`` the answer is agreed over the process group (each process checks its shards).
    """
    flags: list[Tensor] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, Tensor):
            t = _local(obj)
            if t.is_floating_point() and t.numel():
                flags.append(torch.isfinite(t).all())
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(list(tensors))
    if device is None:
        device = flags[0].device if flags else torch.device("cpu")
    ok = torch.stack([f.to(device) for f in flags]).all() if flags else torch.tensor(True, device=device)
    if reduce and dist.is_initialized():
        bad = (~ok).to(torch.float32).reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())
    return bool(ok)


class NonFiniteGuard:
    """Counts steps with a non-finite loss or gradient norm; see the module docstring.

    Args:
        limit: non-finite steps in a row that stop training.
        device: where the per-step flags live.
        skipped: non-finite steps of the run so far (from its checkpoint).
    """

    def __init__(self, limit: int, device: torch.device, skipped: int = 0) -> None:
        self.limit = limit
        self.device = device
        self.skipped = skipped  # whole run, as of the last check
        self.streak = 0  # steps in a row up to the last check
        self.since_save = 0  # skipped since the last checkpoint (a save then prunes nothing)
        self.window = 0  # skipped since the last logged record
        # On the device: [current streak, longest streak since the check, skipped since the check].
        self._stats = torch.zeros(3, dtype=torch.int64, device=device)

    @staticmethod
    def flag(loss: Tensor, grad_norm: Tensor) -> Tensor:
        """A 0-d bool tensor: this step is bad (agreed over the process group: every rank skips it)."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if dist.is_initialized() and dist.get_world_size() > 1:
            b = bad.to(torch.float32).reshape(1)
            dist.all_reduce(b, op=dist.ReduceOp.MAX)
            bad = b[0] > 0
        return bad

    def observe(self, bad: Tensor) -> None:
        """Book one step (device-side; no host sync)."""
        b = bad.to(torch.int64)
        streak = (self._stats[0] + 1) * b
        self._stats = torch.stack([streak, torch.maximum(self._stats[1], streak), self._stats[2] + b])

    def check(self, step: int, hint: Callable[[], str] = str) -> int:
        """Read the counts (one host sync); returns the steps skipped since the previous check.

        Raises:
            TrainingDiverged: ``limit`` steps in a row were non-finite.
        """
        streak, longest, new = (int(v) for v in self._stats.tolist())
        self._stats = torch.tensor([streak, streak, 0], dtype=torch.int64, device=self.device)
        self.skipped += new
        self.since_save += new
        self.window += new
        self.streak = streak
        if longest >= self.limit:
            raise TrainingDiverged(
                f"training diverged: {longest} steps in a row up to step {step} had a non-finite loss or gradient "
                f"norm and were skipped (train.max_nonfinite_steps={self.limit}); nothing non-finite was saved"
                f"{hint()}")
        return new


class StopRequest:
    """Ctrl-C (SIGINT) during :meth:`Trainer.fit`: the first asks for a clean stop, a second interrupts.

    Use as a context manager around the loop and test :attr:`requested` after each step. The
    handler is installed only in the main thread of a single-process run (under torchrun the
    ranks would have to agree on the step first; there Ctrl-C interrupts as before).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    def __enter__(self) -> StopRequest:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
