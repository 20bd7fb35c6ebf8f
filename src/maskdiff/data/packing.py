"""Packing documents into one token stream, in memory or streamed to a memory-mapped file.

Convention (all corpora): the end-of-text id goes *between* consecutive documents, not
after the last one: ``doc0 EOT doc1 EOT doc2``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskdiff.data._cache import atomic_write, save_json_atomic

__all__ = ["pack_documents", "write_packed_memmap", "open_packed_memmap"]


def _check_dtype(dtype: np.dtype, eot_id: int) -> None:
    if not 0 <= eot_id <= np.iinfo(dtype).max:
        raise ValueError(f"eot_id {eot_id} does not fit in {dtype}")


def pack_documents(
    docs: Sequence[Sequence[int] | np.ndarray], eot_id: int, dtype: np.dtype | type = np.uint16
) -> np.ndarray:
    """Concatenate token lists with ``eot_id`` between consecutive documents.

    Returns:
        array of shape ``(sum(len(d) for d in docs) + len(docs) - 1,)``; empty for no docs.
    """
    dtype = np.dtype(dtype)
    _check_dtype(dtype, eot_id)
    if not docs:
        return np.zeros(0, dtype=dtype)
    total = sum(len(d) for d in docs) + len(docs) - 1
    out = np.empty(total, dtype=dtype)
    pos = 0
    for i, d in enumerate(docs):
        if i:
            out[pos] = eot_id
            pos += 1
        out[pos : pos + len(d)] = d
        pos += len(d)
    return out


def write_packed_memmap(
    batches: Iterable[Sequence[Sequence[int]]],
    path: str | os.PathLike[str],
    eot_id: int,
    *,
    dtype: np.dtype | type = np.uint16,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream batches of tokenised documents into a raw binary token file, atomically.

    Writes ``path`` (raw little-endian ``dtype`` tokens, no header) and a sidecar
    ``path + ".json"`` holding ``metadata`` plus ``n_tokens``, ``n_documents`` and
    ``dtype``. Both are written to temporary files and renamed; the sidecar is renamed
    last, so its presence marks a complete cache entry. Memory use is one batch.

    Args:
        batches: an iterable of batches, each a sequence of documents (token id lists).
        path: destination of the token file.
        eot_id: separator inserted between consecutive documents.
        dtype: on-disk integer dtype (``uint16`` holds GPT-2's 50257 ids).
        metadata: extra JSON-serialisable fields for the sidecar.

    Returns:
        the sidecar contents.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    _check_dtype(dtype, eot_id)
    path = Path(path)
    n_tokens = n_docs = 0
    sep = np.array([eot_id], dtype=dtype)
    with atomic_write(path) as f:
        for batch in batches:
            if not batch:
                continue
            packed = pack_documents(batch, eot_id, dtype)
            if n_docs:
                f.write(sep.tobytes())
                n_tokens += 1
            f.write(packed.tobytes())
            n_tokens += packed.size
            n_docs += len(batch)
    meta = dict(metadata or {})
    meta.update(n_tokens=n_tokens, n_documents=n_docs, dtype=dtype.str, eot_id=eot_id)
    save_json_atomic(_sidecar(path), meta)
    return meta


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def open_packed_memmap(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Open a file written by :func:`write_packed_memmap` as a read-only ``np.memmap``.

    Returns:
        ``(tokens, metadata)`` with ``tokens`` of shape ``(n_tokens,)``, or ``None`` when
        the entry is missing or incomplete (no sidecar, or a size mismatch).
    """
    path = Path(path)
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        n = int(meta["n_tokens"])
    except (ValueError, KeyError, TypeError):
        return None
    if path.stat().st_size != n * dtype.itemsize:
        return None
    if n == 0:
        return np.zeros(0, dtype=dtype), meta
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)), meta
