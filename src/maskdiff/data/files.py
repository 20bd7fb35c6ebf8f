"""One's own text files as a corpus: ``data.corpus=files``, ``data.path=FILE | GLOB | FOLDER``.

``data.path`` names one file, a glob (``**`` allowed) or a folder (walked recursively, hidden
entries skipped); files ending in ``.gz``, ``.bz2`` or ``.xz`` are decompressed. Text must be UTF-8
(a file that is not is named with the byte offset). ``data.tokenizer`` chooses the tokens
(:mod:`maskdiff.data.vocab`: ``byte``, the default; ``char``; ``gpt2``; a Hugging Face tokenizer).

Documents and splits:

* Without ``data.records`` every file is one document; documents are joined with the tokenizer's
  end token where it has one. With ``data.records`` every line (or JSONL field) is one record,
  padded to ``data.seq_len`` (:mod:`maskdiff.data.records`).
* Splits are by document (record), deterministic: documents are ordered by a hash of their content
  (BLAKE2b, 8 bytes) and the first 5% (at least one) go to validation, the next 5% (at least one) to
  test, the rest to training; documents with equal content are never split apart, so no text of the
  validation or test split occurs verbatim in training. Within a split, documents keep their file
  order. With fewer than three files (and no ``data.records``), each file is cut at line boundaries
  into its first 90% / next 5% / last 5% of characters instead.
* ``char`` builds its vocabulary from the training split; a validation or test character outside it
  becomes ``<unk>`` (counted: ``unknown`` in the summary and the run's ``meta.json``).

The token streams are written once, document by document (a tqdm bar), to raw memory-mapped files
in the cache (``$MASKDIFF_CACHE/files/``; the format of :mod:`maskdiff.data.packing`), keyed by the
files' paths, sizes and modification times and by the settings; later loads open them directly.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from maskdiff.data._cache import default_cache_dir, hash_key, save_json_atomic, sha256_file
from maskdiff.data.errors import DataError, one_line
from maskdiff.data.hf import _check_not_empty, _fingerprint_files, resolve_local_files
from maskdiff.data.packing import open_packed_memmap
from maskdiff.data.records import draw_rows, iter_records, pad_record, parse_records, record_shard
from maskdiff.data.splits import SPLIT_NAMES, TokenSplits
from maskdiff.data.vocab import (
    NAMED_TOKENIZERS,
    RUN_TOKENIZER_FILE,
    hf_tokenizer_file,
    token_dtype,
    tokenizer_from_dict,
    tokenizer_from_setting,
)

__all__ = ["load_files", "FileSplits", "RecordSplits", "assign_splits", "VAL_FRACTION", "TEST_FRACTION"]

VAL_FRACTION = TEST_FRACTION = 0.05
_VERSION = "files-v1"  # part of every cache key: bump when the layout or the split rule changes
_OPENERS: dict[str, Callable[..., IO[Any]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_printed: set[str] = set()  # cache entries whose summary this process has printed

PathLike = str | os.PathLike[str]


class FileSplits(TokenSplits):
    """:class:`~maskdiff.data.splits.TokenSplits` of local files, with the split statistics in
    :meth:`summary` and :meth:`meta` and the tokenizer the run folder keeps (:meth:`run_files`)."""

    def summary(self) -> str:
        """Files, tokenizer, documents and tokens per split, the split rule and unknown symbols."""
        m = self.metadata
        unit = "records" if m.get("records") else "documents"
        docs = " | ".join(f"{s} {m['documents'][s]:,}" for s in SPLIT_NAMES)
        toks = " | ".join(f"{s} {n:,}" for s, n in self.sizes().items())
        unknown = sum(m["unknown"].values())
        extra = f"; {unknown:,} validation/test characters outside the vocabulary read as <unk>" if unknown else ""
        files = f"{m['n_files']} file{'s' if m['n_files'] != 1 else ''}"
        return (f"{self.name} ({files} at {m['location']!r}; tokenizer {m['tokenizer_name']}, vocab "
                f"{self.vocab_size}): {unit} {docs}; tokens {toks}. Split: {m['split_rule']}{extra}")

    def meta(self) -> dict[str, Any]:
        """What the run's ``meta.json`` records: the files, the split rule, documents and unknown
        symbols per split (and record lengths)."""
        keys = ("location", "n_files", "tokenizer_name", "records", "split_rule", "documents", "unknown",
                "record_lengths")
        return {"files": {k: self.metadata[k] for k in keys if k in self.metadata}}

    def run_files(self) -> dict[str, Any]:
        """Files the run folder keeps next to ``config.json``: its tokenizer (``tokenizer.json``)."""
        return {RUN_TOKENIZER_FILE: self.tokenizer.to_dict()}  # type: ignore[attr-defined]


class RecordSplits(FileSplits):
    """File splits of padded records: each split is ``n_rows`` rows of ``seq_len`` tokens, end to end.

    Training shards hold whole rows and :meth:`draw` samples rows, never a window across two records;
    evaluation scores one record per chunk.
    """

    def _check_length(self, seq_len: int) -> None:
        if seq_len != self.metadata["seq_len"]:
            raise DataError(f"{self.name}: the records were padded to {self.metadata['seq_len']} tokens, not "
                            f"data.seq_len={seq_len}; load them again with data.seq_len={seq_len}")

    def shard_for(self, stream: int, n_streams: int, seq_len: int) -> np.ndarray:
        self._check_length(seq_len)
        return record_shard(self.train, stream, n_streams, seq_len)

    def draw(self, shard: np.ndarray, batch_size: int, seq_len: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_length(seq_len)
        return draw_rows(shard, batch_size, seq_len, generator), None


# ----------------------------------------------------------------------------------------------
# Reading documents


def _open_text(file: Path) -> IO[str]:
    """``file`` as UTF-8 text, decompressed by suffix; line endings kept as they are."""
    opener = _OPENERS.get(file.suffix.lower(), open)
    return opener(file, "rt", encoding="utf-8", newline="")


def _read_errors(file: Path) -> Callable[[BaseException], DataError]:
    def convert(e: BaseException) -> DataError:
        if isinstance(e, UnicodeDecodeError):
            return DataError(f"{file} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start} of "
                             "its text): data.path must name UTF-8 text files (narrow it with a glob such as '*.txt')")
        return DataError(f"{file}: cannot be read ({type(e).__name__}: {one_line(e)}): check the file")
    return convert


def _read_document(file: Path) -> str:
    try:
        with _open_text(file) as f:
            return f.read()
    except (UnicodeDecodeError, OSError, EOFError, lzma.LZMAError) as e:
        raise _read_errors(file)(e) from e


def _file_records(file: Path, mode: tuple[str, str | None]) -> Iterator[tuple[str, str]]:
    try:
        with _open_text(file) as f:
            yield from iter_records(f, str(file), mode)
    except (UnicodeDecodeError, OSError, EOFError, lzma.LZMAError) as e:
        raise _read_errors(file)(e) from e


def _position_pieces(text: str) -> list[str]:
    """A document cut into its first 90% / next 5% / last 5% of characters, at line boundaries."""
    cuts = []
    for frac in (1 - VAL_FRACTION - TEST_FRACTION, 1 - TEST_FRACTION):
        at = int(len(text) * frac)
        nl = text.find("\n", at)
        cuts.append(at if nl < 0 else nl + 1)
    a, b = cuts[0], max(cuts)
    return [text[:a], text[a:b], text[b:]]


def assign_splits(hashes: np.ndarray) -> np.ndarray:
    """Split of each document (0 train, 1 validation, 2 test) from its content hash.

    Documents in hash order (ties by position): the first ``max(1, round(5% n))`` go to validation,
    the next as many to test, the rest to training; a cut that would part equal hashes moves past them.

    Raises:
        DataError: fewer than three documents.
    """
    n = len(hashes)
    if n < 3:
        raise DataError(f"{n} document(s): a train/validation/test split needs at least 3")
    order = np.lexsort((np.arange(n), hashes))
    ranked = hashes[order]

    def cut(k: int) -> int:
        while 0 < k < n and ranked[k] == ranked[k - 1]:
            k += 1
        return k

    a = cut(max(1, round(n * VAL_FRACTION)))
    b = cut(min(n, a + max(1, round(n * TEST_FRACTION))))
    out = np.zeros(n, dtype=np.uint8)
    out[order[:a]] = 1
    out[order[a:b]] = 2
    return out


def _content_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _plan(files: list[Path], mode: tuple[str, str | None] | None,
          progress: bool) -> tuple[Callable[[], Iterator[tuple[str, str]]], np.ndarray, str]:
    """(documents: a function giving a fresh iterator of ``(where, text)``, split of each, the rule in words)."""
    if mode is None and len(files) < 3:
        def pieces() -> Iterator[tuple[str, str]]:
            for f in files:
                for part, text in zip(SPLIT_NAMES, _position_pieces(_read_document(f))):
                    yield f"{f} ({part} part)", text
        rule = "fewer than 3 files: each file cut at line boundaries into its first 90% / next 5% / last 5% of characters"
        return pieces, np.tile(np.arange(3, dtype=np.uint8), len(files)), rule

    def documents() -> Iterator[tuple[str, str]]:
        for f in files:
            if mode is None:
                yield str(f), _read_document(f)
            else:
                yield from _file_records(f, mode)

    unit = "documents" if mode is None else "records"
    hashes = [_content_hash(text) for _, text in tqdm(documents(), desc=f"files: hashing {unit}", unit=unit[:-1],
                                                      disable=None if progress else True)]
    if mode is not None and len(hashes) < 3:
        raise DataError(f"data.path holds {len(hashes)} record(s) ({files[0]}...): a train/validation/test split "
                        "needs at least 3 non-empty lines; use more records")
    rule = (f"{unit} ordered by a hash of their content: the first 5% (at least one) validation, the next 5% test, "
            "the rest training (equal contents stay together)")
    return documents, assign_splits(np.array(hashes, dtype=np.uint64)), rule


# ----------------------------------------------------------------------------------------------
# Building and opening the cache entry


def _build(entry: Path, files: list[Path], mode: tuple[str, str | None] | None, setting: str, seq_len: int | None,
           vocabulary: Any, info: dict[str, Any], progress: bool) -> None:
    """Tokenise the documents into ``entry/{train,validation,test}.bin`` (+ sidecars) and ``meta.json``,
    in a temporary folder renamed into place when complete."""
    documents, assign, rule = _plan(files, mode, progress)
    records = mode is not None
    tok = vocabulary
    if tok is None:
        chars: set[str] | None = None
        if setting == "char":
            chars = set()
            for (_, text), s in zip(documents(), assign):
                if s == 0:
                    chars.update(text)
        tok = tokenizer_from_setting(setting, records=records, characters=chars)
    if records and tok.eos_id is None:
        raise DataError(f"data.records needs a tokenizer with an end token, which {setting!r} has none of (looked for "
                        "its tokenizer_config.json eos_token and <|endoftext|>, </s>, <eos>, ...): add one, or use "
                        "data.tokenizer=char or byte")
    dtype = token_dtype(tok.vocab_size).newbyteorder("<")
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        stats = _write_streams(tmp, documents, assign, tok, dtype, seq_len if records else None, progress)
        for s in SPLIT_NAMES:
            save_json_atomic(tmp / f"{s}.bin.json", {"n_tokens": stats["tokens"][s], "n_documents": stats["documents"][s],
                                                     "dtype": dtype.str, "eot_id": tok.eos_id})
        save_json_atomic(tmp / "meta.json", {**info, **stats, "split_rule": rule, "tokenizer": tok.to_dict()})
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same entry first
            if not (entry / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_streams(folder: Path, documents: Callable[[], Iterator[tuple[str, str]]], assign: np.ndarray, tok: Any,
                   dtype: np.dtype, seq_len: int | None, progress: bool) -> dict[str, Any]:
    """Encode every document into its split's stream (documents joined by the end token; records
    padded to ``seq_len``); returns per-split counts. Records of ``seq_len`` tokens or more: DataError."""
    docs = dict.fromkeys(SPLIT_NAMES, 0)
    tokens, unknown = dict.fromkeys(SPLIT_NAMES, 0), dict.fromkeys(SPLIT_NAMES, 0)
    lengths: dict[str, list[int]] = {s: [] for s in SPLIT_NAMES}
    too_long, longest = 0, (0, "")
    end = None if tok.eos_id is None else np.array([tok.eos_id], dtype=dtype).tobytes()
    handles = {s: open(folder / f"{s}.bin", "wb") for s in SPLIT_NAMES}
    try:
        bar = tqdm(total=len(assign), desc="files: tokenising", unit="record" if seq_len else "doc",
                   disable=None if progress else True)
        with bar:
            for (where, text), s_id in zip(documents(), assign):
                s = SPLIT_NAMES[s_id]
                ids, n_unknown = tok.encode_document(text)
                bar.update(1)
                if seq_len is not None:
                    if len(ids) >= seq_len:
                        too_long += 1
                        longest = max(longest, (len(ids), where))
                        continue
                    lengths[s].append(len(ids))
                    chunk = pad_record(ids, seq_len, tok.eos_id, dtype).tobytes()
                else:
                    chunk = (end if docs[s] and end is not None else b"") + ids.astype(dtype, copy=False).tobytes()
                handles[s].write(chunk)
                docs[s] += 1
                unknown[s] += n_unknown
                tokens[s] += len(chunk) // dtype.itemsize
    finally:
        for h in handles.values():
            h.close()
    if too_long:
        raise DataError(f"{too_long} record(s) do not fit data.seq_len={seq_len} with their end token (the longest, "
                        f"{longest[1]}, has {longest[0]} tokens): set data.seq_len to at least {longest[0] + 1}")
    stats: dict[str, Any] = {"documents": docs, "tokens": tokens, "unknown": unknown}
    if seq_len is not None:
        stats["record_lengths"] = {s: {"min": min(v), "mean": float(np.mean(v)), "max": max(v)} if v else None
                                   for s, v in lengths.items()}
    return stats


def _setting_key(setting: str) -> Any:
    """How a ``data.tokenizer`` value enters the cache key (a Hugging Face file by its content)."""
    if setting in NAMED_TOKENIZERS:
        return setting
    file, eos = hf_tokenizer_file(setting)
    return {"hf_sha256": sha256_file(file), "eos": eos}


def _open_entry(entry: Path, vocabulary: Any = None) -> dict[str, Any] | None:
    """The entry's meta with its memory-mapped streams, or None when it is missing, incomplete, or
    built with another vocabulary than ``vocabulary``."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if vocabulary is not None and meta.get("tokenizer") != vocabulary.to_dict():
        return None
    streams = {s: open_packed_memmap(entry / f"{s}.bin") for s in SPLIT_NAMES}
    if any(v is None for v in streams.values()):
        return None
    meta["streams"] = {s: v[0] for s, v in streams.items()}  # type: ignore[index]
    return meta


def load_files(path: PathLike, *, tokenizer: str | None = None, records: str | None = None,
               seq_len: int | None = None, cache_dir: PathLike | None = None, vocabulary: Any = None,
               progress: bool = True) -> FileSplits:
    """Local text files as train / validation / test token streams (see the module docstring).

    Args:
        path: ``data.path``: a file, a glob or a folder.
        tokenizer: ``data.tokenizer`` (None: ``byte``).
        records: ``data.records`` (None: every file is one document).
        seq_len: ``data.seq_len``; needed with ``records`` (rows are padded to it).
        cache_dir: ``data.cache_dir``.
        vocabulary: a tokenizer to encode with instead of the one ``tokenizer`` names or builds: a
            run's stored tokenizer (:func:`~maskdiff.data.vocab.read_run_tokenizer`), so a run is
            evaluated with exactly its own vocabulary.
        progress: tqdm bars while building, and the summary on stderr once per process.

    Returns:
        :class:`FileSplits` (:class:`RecordSplits` with ``records``), views of read-only memory maps.

    Raises:
        FileNotFoundError: nothing at ``path``, or ``tokenizer`` names no tokenizer file.
        DataError: empty files, text that is not UTF-8, too few documents or records, a record too long.
    """
    if path is None:
        raise DataError("data.corpus=files reads your own text files: set data.path=<a file, a glob or a folder>")
    mode = parse_records(records)
    if mode is not None and seq_len is None:
        raise ValueError("load_files(records=...) pads every record to seq_len: pass seq_len")
    setting = tokenizer or "byte"
    files = resolve_local_files(path)
    _check_not_empty(files, path)
    base = {"version": _VERSION, "files": _fingerprint_files(files), "records": records,
            "seq_len": seq_len if mode else None}
    root = default_cache_dir(cache_dir) / "files"
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(path)).name)[:40] or "files"
    if vocabulary is None or setting in NAMED_TOKENIZERS or Path(setting).expanduser().exists():
        entry = root / f"{slug}-{hash_key({**base, 'tokenizer': _setting_key(setting)})}"
    else:  # a stored Hugging Face tokenizer whose file has gone: key by the tokenizer itself
        entry = root / f"{slug}-{hash_key({**base, 'tokenizer': hash_key(vocabulary.to_dict())})}"
    meta = _open_entry(entry, vocabulary)
    if meta is None and vocabulary is not None:  # built with another vocabulary than the run's
        entry = entry.with_name(f"{entry.name}-v{hash_key(vocabulary.to_dict())}")
        meta = _open_entry(entry, vocabulary)
    if meta is None:
        if entry.exists():  # incomplete or damaged (a cache, never user data): build it again
            shutil.rmtree(entry, ignore_errors=True)
        info = {"location": str(path), "n_files": len(files), "records": records, "seq_len": seq_len if mode else None}
        _build(entry, files, mode, setting, seq_len, vocabulary, info, progress)
        meta = _open_entry(entry, vocabulary)
        if meta is None:  # pragma: no cover - the build is atomic
            raise RuntimeError(f"cache entry {entry} unreadable right after writing it")
    tok = vocabulary if vocabulary is not None else tokenizer_from_dict(meta["tokenizer"], source=str(entry / "meta.json"))
    streams = meta.pop("streams")
    meta.update(cache_dir=str(entry), tokenizer_name=setting if vocabulary is None else tok.name,
                source=str(path))
    cls = RecordSplits if mode is not None else FileSplits
    data = cls("files", tok.vocab_size, tok, streams["train"], streams["validation"], streams["test"], meta)
    if progress and str(entry) not in _printed:
        _printed.add(str(entry))
        print(data.summary(), file=sys.stderr)
    return data
