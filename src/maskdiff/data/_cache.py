"""On-disk cache helpers: cache directory, content hashing, atomic writes, converted image arrays.

Atomic writes come from :mod:`maskdiff.fileio`. :func:`cached_image_arrays` is the cache that the
image loaders (CIFAR-10 from Parquet, ImageNet 64×64) build once and memory-map afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from maskdiff.fileio import atomic_write, write_json_atomic

__all__ = [
    "default_cache_dir",
    "atomic_write",
    "save_npy_atomic",
    "save_json_atomic",
    "sha256_file",
    "hash_key",
    "cached_image_arrays",
]

CACHE_ENV = "MASKDIFF_CACHE"

#: Part of every image cache key: bump it when the converted layout changes.
IMAGE_CACHE_VERSION = "images-v1"


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


def cached_image_arrays(
    name: str,
    files: dict[str, list[Path]],
    cache_dir: str | os.PathLike[str] | None,
    build: Callable[[Path], dict[str, Any]],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Open (or build once, atomically) ``{train,test}{,_labels}.npy`` for ``files``.

    The entry is a folder whose ``meta.json`` marks it complete; it is built in a temporary
    sibling folder and renamed into place, so concurrent builders (DDP ranks) or a killed build
    never leave a partial entry.
    """
    flat = sorted({str(Path(f).resolve()) for fs in files.values() for f in fs})
    desc = {"name": name, "version": IMAGE_CACHE_VERSION, "files": []}
    for f in flat:
        st = os.stat(f)
        desc["files"].append([f, st.st_size, st.st_mtime_ns])
    root = default_cache_dir(cache_dir) / "images"
    entry = root / f"{name}-{hash_key(desc)}"
    names = ("train", "train_labels", "test", "test_labels")
    if not (entry / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            info = build(tmp)
            save_json_atomic(tmp / "meta.json", {"source": desc, **info})
            try:
                os.replace(tmp, entry)
            except OSError:  # another process finished first
                if not (entry / "meta.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    meta["cache_dir"] = str(entry)
    arrays = {k: np.load(entry / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in names}
    for k in ("train_labels", "test_labels"):  # small: keep in memory
        arrays[k] = np.array(arrays[k])
    return arrays, meta
