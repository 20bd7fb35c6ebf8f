"""Atomic file writes: the one place where maskdiff writes a file that someone may be reading
(and the lenient JSON read that goes with it).

Everything a user keeps (checkpoints' JSON, pretrained weights, evaluation results, caches,
plots) is written to a temporary file next to its destination and moved into place with
``os.replace``, so a reader sees either the old file or the complete new one, never a torn
one, and a run killed mid-write leaves the previous file intact. Logs are appended one record per
``write`` (:func:`append_line`), and a torn last record is cut off before the next append
(:func:`repair_last_line`).

A folder that one process writes (a run folder, a ``compare`` folder) is guarded by
:func:`folder_lock`: a second writer fails at once with the holder's PID instead of mixing files.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_path", "atomic_write", "write_json_atomic", "read_json", "append_line", "repair_last_line",
    "FolderLock", "FolderLockedError", "FolderWriteError", "folder_lock", "LOCK_NAME",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, move it onto ``path``.

    The parent folder is created if needed. The file is made world-readable (0644; ``mkstemp``
    creates 0600) and fsynced before the rename. On error the temporary file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed the file without fsync
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a temporary sibling of ``path`` for binary writing; on success, move it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON (with a final newline) to ``path`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON content of ``path``, or None when it is missing, unreadable or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# -- appends ------------------------------------------------------------------------------------


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append ``line`` (a newline is added) to ``path`` with one ``write`` on an ``O_APPEND``
    descriptor, so a record is never interleaved with another; a process killed mid-write leaves
    at most a torn last line (see :func:`repair_last_line`)."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # a short write (signal, full pipe) goes on where it stopped
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def repair_last_line(path: str | os.PathLike[str]) -> int:
    """Cut a torn last line (no final newline: a writer killed mid-record) off ``path``.

    Returns the number of bytes removed (0 when the file ends with a newline or does not exist),
    so that the next :func:`append_line` starts a line of its own instead of being glued to the
    torn one.
    """
    path = Path(path)
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            keep, block = 0, 1 << 16
            end = size
            while end > 0:  # find the last newline, reading backwards block by block
                start = max(0, end - block)
                f.seek(start)
                chunk = f.read(end - start)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    keep = start + i + 1
                    break
                end = start
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            return size - keep
    except FileNotFoundError:
        return 0


# -- one writer per folder -----------------------------------------------------------------------

LOCK_NAME = ".lock"
_HELD: dict[str, list[Any]] = {}  # real path of a lock file -> [FolderLock, holders in this process]


class FolderLockedError(RuntimeError):
    """Another process holds the folder's write lock (a user error: exit code 2)."""

    exit_code = 2


class FolderWriteError(RuntimeError):
    """The folder cannot be written (read-only, no permission): exit code 2."""

    exit_code = 2


class FolderLock:
    """An exclusive, advisory write lock on a folder: the file ``FOLDER/.lock``, ``flock``-ed.

    The kernel releases an ``flock`` when its holder dies, so a lock left by a killed process is
    stale by construction: the file may still be there, but the next writer takes it over. The
    file holds the holder's PID, host and start time, for the message a second writer gets.
    Within one process the lock is re-entrant (a counter), so code that opens one folder twice
    in sequence (e.g. a trainer dropped without ``close``, then a resumed one) is not refused.
    Use :func:`folder_lock` (a context manager) or :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self.fd = fd

    @classmethod
    def acquire(cls, folder: str | os.PathLike[str]) -> FolderLock:
        """Take the lock of ``folder`` (which must exist), or raise :class:`FolderLockedError`."""
        import fcntl
        import socket
        import time

        folder = Path(folder)
        path = folder / LOCK_NAME
        key = os.path.realpath(path)
        if key in _HELD:
            _HELD[key][1] += 1
            return _HELD[key][0]
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise FolderWriteError(f"cannot write into {folder} ({err.strerror}); "
                                       f"choose a folder you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderLockedError(
                    f"{folder} is being written by {holder}; wait for it to finish or stop it, "
                    f"or choose another folder") from None
            except OSError:  # a file system without flock (some network mounts): no lock
                os.close(fd)
                return cls(folder, -1)
            # The holder we waited on may have removed the file as it released it: then this
            # descriptor locks an orphan inode, and the lock must be taken on the new file.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        lock = cls(folder, fd)
        _HELD[key] = [lock, 1]
        return lock

    def release(self, moved_to: str | os.PathLike[str] | None = None) -> None:
        """Give the lock up (the last holder in this process removes ``.lock`` and unlocks).

        ``moved_to``: the folder was renamed while locked; its lock file is now there.
        """
        if self.fd < 0:
            return
        key = os.path.realpath(self.folder / LOCK_NAME)
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[key]
        path = Path(moved_to or self.folder) / LOCK_NAME
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                path.unlink()  # while still locked: a waiting writer then retries on a new file
        os.close(self.fd)
        self.fd = -1


def _read_holder(fd: int) -> str:
    """What a lock file says about its holder ("PID N on HOST since TIME"), for messages."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.startswith("PID ") else "another process"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[FolderLock]:
    """Hold the write lock of ``folder`` for the block (created if missing); see :class:`FolderLock`.

    Raises:
        FolderLockedError: another process is writing the folder (the message names its PID).
    """
    Path(folder).mkdir(parents=True, exist_ok=True)
    lock = FolderLock.acquire(folder)
    try:
        yield lock
    finally:
        lock.release()
