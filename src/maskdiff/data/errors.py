"""The errors the data layer raises for bad inputs, and the checks of a user-given path.

Every one is a ``ValueError``, ``FileNotFoundError`` or ``RuntimeError`` (what the CLI turns into
one ``error: ...`` line with exit code 2) whose message is one line naming the file or setting,
the problem and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DataError",
    "MissingColumnError",
    "MissingDependencyError",
    "UnsafePickleError",
    "one_line",
    "check_data_file",
    "quiet_library_errors",
]


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space), at most
    ``limit`` characters (a foreign library's message can be a page long)."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


class DataError(ValueError):
    """A data file or setting is malformed or too small; the message is one line naming the file
    (or the ``data.*`` key), the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message, limit=2000))


class MissingColumnError(DataError, KeyError):
    """A text corpus has no column of the requested name (also a ``KeyError``, as before 0.2)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsafePickleError(pickle.UnpicklingError, DataError):
    """A pickle asks for a global that the restricted unpickler does not allow; nothing was executed."""


class MissingDependencyError(ImportError, RuntimeError):
    """An optional package is not installed; the message names the extra to install."""


def check_data_file(path: str | os.PathLike[str], what: str, *, key: str = "data.path") -> Path:
    """``path`` as a ``Path`` if it is a non-empty readable file, else a one-line error.

    Raises:
        FileNotFoundError: nothing at ``path``.
        DataError: ``path`` is a folder, empty or unreadable.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist: pass {what}")
    if p.is_dir():
        raise DataError(f"{key}={str(path)!r} is a folder: pass {what} itself")
    try:
        size = p.stat().st_size
        with open(p, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{p}: cannot be read ({one_line(e.strerror or e)}): pass {what}") from e
    if size == 0:
        raise DataError(f"{p} is empty: pass {what}")
    return p


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def quiet_library_errors(logger_name: str) -> Iterator[None]:
    """Drop ERROR records of ``logger_name``'s handlers within the block (warnings still show).

    ``datasets`` logs a failure (``Failed to load JSON from file ...``) before raising it; the
    data layer re-raises it as one line naming the file, so the log line would only repeat it.
    """
    handlers = logging.getLogger(logger_name).handlers
    filt = _DropErrors()
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)
