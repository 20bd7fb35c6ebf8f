"""Checks the commands run before any work: arguments, output paths, result files, weights.

Each raises :class:`UsageError` (a ``ValueError``: the command line prints it as one line and exits
with code 2) naming the flag or file, the value and the fix; :class:`WorkFailed` (exit code 1) is
for a computation that failed (e.g. produced NaN), where nothing was written. Exit codes travel as
an ``exit_code`` attribute, which any exception of the package may carry.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = [
    "UsageError",
    "WorkFailed",
    "positive_int",
    "finite_number",
    "is_writable",
    "check_output_file",
    "check_output_folder",
    "check_run_writable",
    "settings_differ",
    "check_finite_weights",
]


class UsageError(ValueError):
    """A bad argument or path; nothing was done. Exit code 2."""

    exit_code = 2


class WorkFailed(RuntimeError):
    """The work itself failed (non-finite result, broken weights); nothing was written. Exit code 1."""

    exit_code = 1


def positive_int(flag: str, value: int | None, *, fix: str = "") -> None:
    """``value`` (when given) must be an integer ≥ 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UsageError(f"{flag} {value}: must be a positive integer{'; ' + fix if fix else ''}")


def finite_number(flag: str, value: float | None, *, minimum: float | None = None) -> None:
    """``value`` (when given) must be a finite number (≥ ``minimum`` when given)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{flag} {value}: must be a finite number")
    if minimum is not None and value < minimum:
        raise UsageError(f"{flag} {value}: must be at least {minimum:g}")


def is_writable(folder: str | os.PathLike) -> bool:
    """Whether files can be created in the existing folder ``folder``."""
    return os.access(folder, os.W_OK | os.X_OK)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: str | os.PathLike, flag: str, *, may_exist: bool = False) -> Path:
    """A file the command will write: its folder must exist and be writable; unless ``may_exist``
    it must not exist (files given by the user are never overwritten)."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() and not may_exist:
        raise UsageError(f"{flag} {path}: exists; choose another {flag} (files are never overwritten)")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"{flag} {path}: folder {folder} {what}; create it first (mkdir -p {folder}) "
                         f"or choose another {flag}")
    if not is_writable(folder):
        raise UsageError(f"{flag} {path}: folder {folder} is not writable; choose another {flag}")
    return path


def check_output_folder(folder: str | os.PathLike, flag: str) -> Path:
    """A folder the command will write into (created if missing): it must be a folder, or be
    creatable, and be writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder}: exists and is not a folder; give a folder")
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise UsageError(f"{flag} {folder}: {base} is a file, so the folder cannot be created; give another folder")
    if not is_writable(base):
        where = "is not writable" if base == folder.absolute() else f"cannot be created ({base} is not writable)"
        raise UsageError(f"{flag} {folder}: {where}; choose a folder you can write to")
    return folder


def check_run_writable(run_dir: str | os.PathLike, command: str, instead: str) -> None:
    """A command that writes into a run folder: refuse a read-only one, saying where to write instead."""
    if not is_writable(run_dir):
        raise UsageError(f"{run_dir} is not writable and `maskdiff {command}` writes into it; {instead}")


def settings_differ(stored: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    """``key stored → wanted`` for every setting recorded in ``stored`` that differs from ``wanted``
    (settings a file does not record are not compared: files of older versions lack some)."""
    if not isinstance(stored, dict):
        return []
    return [f"{k} {stored[k]!r} → {v!r}" for k, v in wanted.items() if k in stored and stored[k] != v]


def check_finite_weights(run: Any) -> None:
    """A loaded run (:class:`maskdiff.runs.LoadedRun`) whose weights hold NaN or inf cannot give a
    result: say which file and what to do, before any work."""
    import torch

    from maskdiff.checkpoint import latest_checkpoint

    for name, tensor in run.model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            ckpt = latest_checkpoint(run.path)
            file = (ckpt / ("ema.safetensors" if run.weights == "ema" else "model.safetensors")) if ckpt else run.path
            other = "; try --weights raw" if run.weights == "ema" else ""
            raise WorkFailed(f"{file} holds non-finite values (NaN or inf, first in {name}): the run diverged by "
                             f"step {run.step}; nothing was computed{other}, or evaluate a run that did not diverge")


def settings_suffix(settings: list[tuple[str, Any, Any]]) -> str:
    """``-<tag><value>`` for each ``(tag, value, default)`` whose value is not the default, in order:
    result names that encode every setting that changes the result, while the default settings
    keep the plain name (e.g. ``[("K", 2, 1), ("seed", 0, 0)]`` → ``"-K2"``)."""
    parts = []
    for tag, value, default in settings:
        if value != default:
            parts.append(f"-{tag}{'' if value is True else value}")
    return "".join(parts)
