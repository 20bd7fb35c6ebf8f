"""Records of variable length (``data.records``): one example per line or per JSONL field, padded.

``data.records=lines`` reads every non-empty line of every file as one record (a trailing
``\\r`` is dropped); ``data.records=jsonl:FIELD`` reads one JSON object per non-empty line and
takes its string field ``FIELD``. A record of ``n`` tokens becomes one row of ``data.seq_len``
tokens: its ids, then the tokenizer's end token repeated to the end of the row (at least once, so
every row says where its record ends). The end/pad token is an ordinary token of the model
(docs/math.md, "Records: padding with the end token"); decoding cuts a row at its first end token.
A record of ``data.seq_len`` tokens or more is an error naming the longest one and the
``data.seq_len`` that would hold it (nothing is truncated).

:class:`~maskdiff.data.files.RecordSplits` keeps the padded rows of each split as one stream,
``(n_rows · L,)``, so evaluation scores exactly one record per chunk; training draws whole rows at
random (:func:`record_shard`, :func:`draw_rows`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO

import numpy as np
import torch

from maskdiff.data.batches import shard
from maskdiff.data.errors import DataError

__all__ = ["parse_records", "iter_records", "RECORD_MODES", "pad_record", "record_shard", "draw_rows"]

RECORD_MODES = ("lines", "jsonl:FIELD")


def parse_records(setting: str | None) -> tuple[str, str | None] | None:
    """``data.records`` as ``(mode, field)``: None (documents), ``("lines", None)`` or ``("jsonl", FIELD)``.

    Raises:
        DataError: any other value.
    """
    if setting is None:
        return None
    if setting == "lines":
        return "lines", None
    if setting.startswith("jsonl:") and setting[len("jsonl:"):].strip():
        return "jsonl", setting[len("jsonl:"):].strip()
    raise DataError(f"data.records={setting!r}: expected lines (one record per line) or jsonl:FIELD (one JSON "
                    "object per line, the record in its string field FIELD)")


def iter_records(stream: IO[str], where: str, mode: tuple[str, str | None]) -> Iterator[tuple[str, str]]:
    """``(where:line, record)`` for every record of an open text file; blank lines are skipped.

    Raises:
        DataError: a JSONL line that is not an object with a string field (names the file and line).
    """
    kind, key = mode
    for number, line in enumerate(stream, 1):
        line = line.rstrip("\n").removesuffix("\r")
        if not line.strip():
            continue
        if kind == "lines":
            yield f"{where}:{number}", line
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}:{number} is not a JSON object ({e}): data.records=jsonl:{key} needs one JSON "
                            "object per line") from None
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{where}:{number} has no string field {key!r} (data.records=jsonl:{key}): name the "
                            "field that holds the record")
        yield f"{where}:{number}", value


def pad_record(ids: np.ndarray, seq_len: int, end_id: int, dtype: np.dtype) -> np.ndarray:
    """One row: ``ids`` then ``end_id`` up to ``seq_len`` (the caller checks ``len(ids) < seq_len``)."""
    row = np.full(seq_len, end_id, dtype=dtype)
    row[: len(ids)] = ids
    return row


def record_shard(train: np.ndarray, stream: int, n_streams: int, seq_len: int) -> np.ndarray:
    """Stream ``stream``'s whole rows of a padded training split (sizes differ by at most one row).

    Raises:
        ValueError: the shard holds no row.
    """
    s = shard(train, stream, n_streams, align=seq_len)
    if len(s) < seq_len:
        raise ValueError(f"training shard {stream} of {n_streams} holds no record: use more records or fewer "
                         "processes × train.grad_accum")
    return s


def draw_rows(rows_stream: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` rows of ``seq_len`` tokens drawn uniformly with replacement (one ``torch.randint``
    on ``generator``, so a restored generator continues the stream); never a window across two records.

    Returns:
        int64 ``(batch_size, seq_len)`` on the CPU.
    """
    rows = rows_stream.reshape(-1, seq_len)
    idx = torch.randint(0, rows.shape[0], (batch_size,), generator=generator, device=generator.device)
    return torch.from_numpy(np.asarray(rows[idx.cpu().numpy()], dtype=np.int64))
