"""Text corpora read through Hugging Face ``datasets`` (local files or the Hub), GPT-2 packed.

Pipeline: ``datasets`` yields documents (a ``text`` column) in a fixed order -> each is
GPT-2 tokenised (``<|endoftext|>`` inside the text is treated as plain text) -> documents
are joined with the end-of-text id 50256 between them -> the stream is written as a raw
``uint16`` file and opened as a read-only ``np.memmap``. The cache file is keyed by a hash
of the source (path/glob resolved to files with their sizes and mtimes, or Hub id,
config, split and revision), the text column, ``max_documents`` and the tokenizer, so a
second load costs only the memmap.

Split rule (deterministic, computed at load time from the packed stream): the last
``test_fraction`` of the tokens is test, the ``val_fraction`` before it validation, the
rest train; each split point is moved forward to the next end-of-text separator so no
document straddles two splits (the separator starts the later split). Only one Hugging
Face split (``split="train"`` by default) is read: OpenWebText, for example, has no other,
so validation and test are held out from it.

``datasets`` is imported lazily (it takes about a second to import).
"""

from __future__ import annotations

import glob as globlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from maskdiff.data._cache import default_cache_dir, hash_key
from maskdiff.data.errors import (
    DataError,
    MissingColumnError,
    MissingDependencyError,
    one_line,
    quiet_library_errors,
)
from maskdiff.data.packing import open_packed_memmap, write_packed_memmap
from maskdiff.data.splits import TokenSplits, check_fractions, split_by_fraction
from maskdiff.data.tokenizers import GPT2_RANKS_SHA256, GPT2Tokenizer


def import_datasets() -> Any:
    """The Hugging Face ``datasets`` module, or a :class:`~maskdiff.data.errors.MissingDependencyError`
    (an ``ImportError`` and a ``RuntimeError``) that says how to install it."""
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            "Hugging Face corpora (hf:..., openwebtext, fineweb) need the `datasets` package, which "
            "is not installed: pip install 'maskdiff[hf]' (or pip install datasets==5.2.0)"
        ) from None
    return datasets

__all__ = ["load_hf_corpus", "HF_PRESETS", "resolve_local_files"]

PathLike = str | os.PathLike[str]

#: Named corpora: Hub id, config and default held-out fractions. Pass ``path=`` to read a
#: local copy (files or a directory) instead of the Hub.
HF_PRESETS: dict[str, dict[str, Any]] = {
    "openwebtext": {
        "source": "Skylion007/openwebtext",
        "val_fraction": 0.01,
        "test_fraction": 0.01,
    },
    "fineweb": {
        "source": "HuggingFaceFW/fineweb",
        "config": "sample-10BT",
        "val_fraction": 0.01,
        "test_fraction": 0.01,
    },
    "fineweb-edu": {
        "source": "HuggingFaceFW/fineweb-edu",
        "config": "sample-10BT",
        "val_fraction": 0.01,
        "test_fraction": 0.01,
    },
}

# File suffix -> datasets packaged builder.
_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".csv": "csv",
    ".arrow": "arrow",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_PACKER_VERSION = "packed-v1"


def _builder_for(file: str) -> str | None:
    name = file.lower()
    for comp in _COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    return _BUILDERS.get(os.path.splitext(name)[1])


def resolve_local_files(path: PathLike) -> list[Path]:
    """Sorted list of files named by ``path``: one file, a glob (``**`` allowed) or a directory.

    Directories are walked recursively (hidden files and directories skipped).

    Raises:
        FileNotFoundError: nothing matches.
    """
    p = str(Path(path).expanduser())
    if os.path.isdir(p):
        files = []
        for root, dirs, names in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [Path(root) / n for n in names if not n.startswith(".")]
        files = sorted(files)
    elif os.path.isfile(p):
        files = [Path(p)]
    else:
        files = sorted(Path(f) for f in globlib.glob(p, recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(
            f"no data files found at {str(path)!r}: pass an existing file, a glob such as "
            "'data/*.parquet', or a dataset directory"
        )
    return files


def _check_not_empty(files: list[Path], path: PathLike) -> None:
    """One line naming the file when every data file at ``path`` is empty (0 bytes)."""
    if all(f.stat().st_size == 0 for f in files):
        which = str(files[0]) if len(files) == 1 else f"all {len(files)} files at {str(path)!r}"
        raise DataError(f"{which} is empty (0 bytes): data.path must name files holding documents")


def _fingerprint_files(files: list[Path]) -> list[list[Any]]:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _is_saved_to_disk(d: Path) -> bool:
    return (d / "dataset_dict.json").is_file() or (
        (d / "state.json").is_file() and (d / "dataset_info.json").is_file()
    )


def _open_dataset(
    source: str | None,
    path: PathLike | None,
    *,
    config: str | None,
    split: str,
    streaming: bool,
    revision: str | None,
    hf_cache_dir: Path,
    dataset_kwargs: dict[str, Any],
) -> tuple[Callable[[], Any], dict[str, Any]]:
    """Return ``(open_dataset, fingerprint)``; the fingerprint is computed without reading data.

    ``datasets`` is imported inside ``open_dataset`` only, so a cache hit never imports it.
    """
    if path is not None:
        local = Path(path).expanduser()
        if local.is_dir() and _is_saved_to_disk(local):
            files = _fingerprint_files(resolve_local_files(local))
            fp = {"kind": "saved", "files": files, "split": split}

            def open_saved() -> Any:
                datasets = import_datasets()

                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise DataError(f"{local} has splits {list(ds)}, no split {split!r}: pass split=<one of them>")
                    ds = ds[split]
                return ds

            return open_saved, fp
        files = resolve_local_files(local)
        _check_not_empty(files, path)
        fp = {"kind": "local", "files": _fingerprint_files(files), "config": config}
        dir_kinds = {_builder_for(str(f)) for f in files} - {None} if local.is_dir() else set()
        if dir_kinds == {"text"} and source is None:
            # A folder of plain-text documents: one document per file (not per line).
            files = [f for f in files if _builder_for(str(f)) == "text"]
            source = "text"
        if local.is_dir() and source is None:
            # A dataset directory (e.g. a Hub repo snapshot): datasets infers the format
            # and the splits from the file names.
            args: tuple[Any, ...] = (str(local),)
            kw: dict[str, Any] = {"name": config, "split": split}
            fp["split"] = split
        else:
            builder = source
            if builder is None:
                kinds = {_builder_for(str(f)) for f in files}
                if len(kinds) != 1 or None in kinds:
                    raise ValueError(
                        f"cannot infer the file format of {str(path)!r} (suffixes "
                        f"{sorted({f.suffix for f in files})}); use files ending in "
                        f"{sorted(_BUILDERS)} (optionally compressed) or name the builder, "
                        "e.g. load_corpus('hf:json', path=...)"
                    )
                builder = kinds.pop()
            args = (builder,)
            kw = {"data_files": [str(f) for f in files], "split": "train"}
            if builder == "text":
                kw["sample_by"] = "document"  # one document per file, not per line
            fp["builder"] = builder
        kw.update(dataset_kwargs)
        fp["dataset_kwargs"] = dataset_kwargs
    else:
        if source is None:
            raise ValueError("load_hf_corpus needs a Hub dataset id (source) or a local path")
        args = (source,)
        kw = {"name": config, "split": split, "revision": revision, **dataset_kwargs}
        fp = {"kind": "hub", "source": source, "config": config, "split": split,
              "revision": revision, "dataset_kwargs": dataset_kwargs}

    def open_builder() -> Any:
        datasets = import_datasets()

        try:
            with quiet_library_errors("datasets"):  # the error below says it in one line
                return datasets.load_dataset(*args, streaming=streaming, cache_dir=str(hf_cache_dir), **kw)
        except Exception as e:
            where = f"local files {str(path)!r}" if path is not None else f"Hub dataset {source!r}"
            hint = (
                "If you are offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE or no network), "
                "download the data files elsewhere and pass path=<file, glob or directory>."
                if path is None
                else "Check the files' format and that they have the text column."
            )
            raise RuntimeError(
                f"datasets.load_dataset failed for {where} ({type(e).__name__}: {one_line(e)}). {hint}"
            ) from e

    return open_builder, fp


def _document_batches(
    ds: Any,
    text_column: str,
    batch_docs: int,
    max_documents: int | None,
    tok: GPT2Tokenizer,
    bar: tqdm,
) -> Iterator[list[list[int]]]:
    """Yield batches of tokenised documents (empty or missing texts are skipped)."""
    cols = getattr(ds, "column_names", None)  # None for some streaming datasets
    if cols is not None:
        _check_column(cols, text_column)
        if len(cols) > 1:
            ds = ds.select_columns([text_column])
    seen = 0
    for batch in ds.iter(batch_size=batch_docs):
        _check_column(list(batch), text_column)
        texts = batch[text_column]
        if max_documents is not None:
            texts = texts[: max_documents - seen]
        seen += len(texts)
        bar.update(len(texts))
        texts = [t for t in texts if t]
        if texts:
            yield tok.encode_batch(texts)
        if max_documents is not None and seen >= max_documents:
            return


def _check_column(columns: list[str], text_column: str) -> None:
    if text_column not in columns:
        raise MissingColumnError(
            f"no column {text_column!r}; the dataset has columns {sorted(columns)}: name the text "
            f"column {text_column!r} in the files, or pass text_column=<name> to load_corpus"
        )


def _build_packed(
    opener: Callable[[], Any],
    where: str,
    cache_file: Path,
    tok: GPT2Tokenizer,
    *,
    name: str,
    text_column: str,
    batch_docs: int,
    max_documents: int | None,
    progress: bool,
    key_desc: dict[str, Any],
) -> None:
    """Tokenise the documents of ``opener()`` into the packed cache file ``cache_file``.

    A failure while reading the documents (bad JSON, a missing column, a broken Parquet file) is
    one line naming ``where``; ``datasets``' own log line of it is dropped.
    """
    ds = opener()  # imports datasets, which sets up its log handler
    with quiet_library_errors("datasets"):
        total = len(ds) if hasattr(ds, "__len__") else None
        if max_documents is not None:
            total = max_documents if total is None else min(total, max_documents)
        # disable=None: no bar when stderr is not a terminal (a log file, a test)
        with tqdm(total=total, desc=f"{name}: tokenising", unit="doc", disable=None if progress else True) as bar:
            batches = _document_batches(ds, text_column, batch_docs, max_documents, tok, bar)
            try:
                write_packed_memmap(batches, cache_file, tok.eot_id, dtype=np.uint16, metadata={"key": key_desc})
            except MissingColumnError as e:
                raise MissingColumnError(f"{where}: {e}") from e
            except Exception as e:
                if isinstance(e, (DataError, RuntimeError, ImportError, OSError)):
                    raise
                raise DataError(
                    f"{where}: reading the documents failed ({type(e).__name__}: {one_line(e)}); check "
                    f"the files' format (one of {sorted(_BUILDERS)}, a JSON object per line for .jsonl) "
                    f"and that they have a {text_column!r} column"
                ) from e


def load_hf_corpus(
    source: str | None = None,
    *,
    path: PathLike | None = None,
    cache_dir: PathLike | None = None,
    name: str | None = None,
    config: str | None = None,
    split: str = "train",
    revision: str | None = None,
    text_column: str = "text",
    streaming: bool = True,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_documents: int | None = None,
    rebuild: bool = False,
    progress: bool = True,
    batch_docs: int = 1024,
    dataset_kwargs: dict[str, Any] | None = None,
) -> TokenSplits:
    """Load a text corpus with ``datasets``, GPT-2 tokenise and pack it, cache it as a memmap.

    Args:
        source: Hub dataset id (``"Skylion007/openwebtext"``) or a ``datasets`` builder
            name (``"json"``, ``"parquet"``, ``"text"``) to force the format of ``path``.
        path: local data instead of the Hub: a file, a glob (``"owt/*.parquet"``), a dataset
            directory (format inferred by ``datasets``) or a ``save_to_disk`` directory.
            File formats by suffix: ``.json``/``.jsonl`` (one object per line), ``.parquet``,
            ``.csv``, ``.arrow``, ``.txt`` (one document per file); ``.gz``/``.zst``/...
            compressed versions too. A directory of ``.txt`` files is one document per
            file; any other directory is handed to ``datasets`` as a dataset repository
            (format and split names inferred from the file names).
        cache_dir: where the packed ``.bin`` (+ ``.json`` sidecar) and ``datasets``' own
            cache (``<cache_dir>/hf-datasets``) go; default ``$MASKDIFF_CACHE`` or
            ``~/.cache/maskdiff``.
        name: corpus name for the result (default derived from source/path).
        config, split, revision: passed to ``datasets.load_dataset`` (Hub / directory).
            A Hub source is cached by id/config/split/revision, not by content: pin
            ``revision`` or pass ``rebuild=True`` to pick up upstream changes.
        text_column: the column holding document text.
        streaming: iterate without materialising an Arrow copy (default; the packed
            memmap is the cache that matters).
        val_fraction, test_fraction: held-out fractions of tokens (see module docstring).
        max_documents: only the first N documents (part of the cache key).
        rebuild: ignore an existing cache entry.
        progress: tqdm bar while tokenising.
        batch_docs: documents per tokenisation batch (tiktoken uses threads within one).
        dataset_kwargs: extra keyword arguments for ``datasets.load_dataset``.

    Returns:
        :class:`TokenSplits` whose splits are views of one read-only ``uint16`` memmap;
        ``metadata["from_cache"]`` says whether the cache was hit.
    """
    if max_documents is not None and max_documents <= 0:
        raise ValueError(f"max_documents must be positive, got {max_documents}")
    check_fractions(val_fraction, test_fraction)  # fail before tokenising, not after
    tok = GPT2Tokenizer()
    root = default_cache_dir(cache_dir)
    dataset_kwargs = dict(dataset_kwargs or {})
    opener, fp = _open_dataset(
        source, path, config=config, split=split, streaming=streaming, revision=revision,
        hf_cache_dir=root / "hf-datasets", dataset_kwargs=dataset_kwargs,
    )
    key_desc = {
        "source": fp,
        "text_column": text_column,
        "max_documents": max_documents,
        "tokenizer": {"name": tok.name, "ranks_sha256": GPT2_RANKS_SHA256, "eot": tok.eot_id},
        "packer": _PACKER_VERSION,
    }
    if name is None:
        base = source if source is not None else Path(str(path)).name
        name = f"hf:{base}"
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    cache_file = root / "packed" / f"{slug}-{hash_key(key_desc)}.bin"

    t0 = time.perf_counter()
    opened = None if rebuild else open_packed_memmap(cache_file)
    from_cache = opened is not None
    where = f"local files {str(path)!r}" if path is not None else f"Hub dataset {source!r}"
    if opened is None:
        _build_packed(opener, where, cache_file, tok, name=name, text_column=text_column, batch_docs=batch_docs,
                      max_documents=max_documents, progress=progress, key_desc=key_desc)
        opened = open_packed_memmap(cache_file)
        if opened is None:  # pragma: no cover - the write above is atomic
            raise RuntimeError(f"cache entry {cache_file} unreadable right after writing it")
    tokens, meta = opened
    if tokens.shape[0] == 0:
        raise DataError(
            f"{name}: no text found in {where} (0 tokens from {meta.get('n_documents', 0)} documents); "
            f"check data.path and that the {text_column!r} column holds text"
        )
    a, b = split_by_fraction(tokens, val_fraction, test_fraction, boundary_token=tok.eot_id)
    info = {
        "cache_file": str(cache_file),
        "from_cache": from_cache,
        "seconds": time.perf_counter() - t0,
        "n_documents": meta["n_documents"],
        "split_rule": f"last {test_fraction} of tokens = test, {val_fraction} before = validation, "
        "split points moved forward to the next end-of-text",
        "source": fp,
        "location": str(path) if path is not None else source,
    }
    return TokenSplits(name, tok.vocab_size, tok, tokens[:a], tokens[a:b], tokens[b:], info)
