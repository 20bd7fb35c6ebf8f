"""A run's log: ``metrics.jsonl`` (and TensorBoard when installed), and the train scalars of the
steps between two records.

Records are appended one ``write`` each (:func:`maskdiff.fileio.append_line`); a torn last
record of a killed run is cut off when the run is resumed (:mod:`maskdiff.training.resume`). The
window sums the steps' scalars on the device, skipping steps whose loss or gradient was not
finite, so that no step waits for the device; the means are read once per record.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maskdiff.checkpoint import RunWriteError
from maskdiff.fileio import append_line

__all__ = ["Logbook"]


class Logbook:
    """``RUN/metrics.jsonl`` and the logging window; ``enabled`` on rank 0 only (others write nothing)."""

    def __init__(self, out_dir: Path, *, enabled: bool) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = _tensorboard(out_dir) if enabled else None
        self.reset()

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (one write) and send its numbers to TensorBoard."""
        if not self.enabled:
            return
        try:
            append_line(self.path, json.dumps(record))
        except OSError as err:
            raise RunWriteError(f"could not append to {self.path} ({err.strerror}); free some space (or fix the "
                                f"folder) and continue with --resume") from None
        if self.tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step",):
                    self.tb.add_scalar(f"{split}/{key}", value, record["step"])

    def reset(self) -> None:
        """Start a new window."""
        self.sums: dict[str, Any] = {}
        self.steps = 0
        self.finite: Any = 0
        self.start = time.perf_counter()

    def add(self, scalars: dict[str, Any]) -> None:
        """Add one step's scalars (0-d device tensors, and plain numbers such as ``lr``); a step
        with ``nonfinite`` true adds nothing to the tensor sums."""
        ok = ~scalars.pop("nonfinite")
        for key, value in scalars.items():
            if isinstance(value, Tensor):
                value = torch.where(ok, value.double(), 0.0)
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.finite = self.finite + ok.long()
        self.steps += 1

    def means(self) -> dict[str, float]:
        """The window's means: measurements over its finite steps (NaN when none), settings over all."""
        n = int(self.finite)
        return {k: (float(v) / n if n else math.nan) if isinstance(v, Tensor) else v / self.steps
                for k, v in self.sums.items()}

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _tensorboard(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: JSONL only
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))
