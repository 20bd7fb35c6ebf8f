"""On-disk cache helpers: cache directory, content hashing, atomic writes (from maskdiff.fileio)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from maskdiff.fileio import atomic_write, write_json_atomic

__all__ = ["default_cache_dir", "atomic_write", "save_npy_atomic", "save_json_atomic", "sha256_file", "hash_key"]

CACHE_ENV = "MASKDIFF_CACHE"


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$MASKDIFF_CACHE``, else ``~/.cache/maskdiff``.

    Read at call time (never at import). The directory is not created here.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/maskdiff").expanduser()


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


def save_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON to ``path`` atomically."""
    write_json_atomic(path, obj, sort_keys=True)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_key(obj: Any, length: int = 16) -> str:
    """Short stable hash of a JSON-serialisable description (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]
