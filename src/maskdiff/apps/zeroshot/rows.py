"""The raw rows of a zero-shot data set, from the Hugging Face Hub or a local copy.

LAMBADA and WikiText are Parquet repositories and load by name. PTB and LM1B are loading-script
repositories; they are read from the Hub's Parquet export (branch ``refs/convert/parquet``, files
``<config>/<split>/*.parquet``). Hub data are streamed (only the split's files are read); with
``streaming=False`` ``datasets`` downloads and caches the whole config (all its splits), which
later offline runs can reuse. ``path=`` reads a local copy instead — needed offline: a file, a
glob or a folder, in any of the forms the data sets come in: Parquet (a Hub snapshot or the
Parquet export, e.g. ``wikitext-2-raw-v1/test-00000-of-00001.parquet``), JSON lines (OpenAI's
``lambada_test.jsonl``), or plain text, one row per line (``wiki.test.raw``, ``ptb.test.txt``,
the LM1B ``heldout`` shards). In a folder the files of the split are picked by name (``test`` /
``heldout``, ``validation`` / ``valid``, ``train``), below a sub-folder named after the config when
there is one; a file or glob is read as the split whatever its name. Plain-text lines become
rows as the Hub builders made them: WikiText rows keep their line break and a blank line becomes
``""``; PTB and LM1B lines are stripped.

Split: ``test`` by default (LAMBADA has only a test split; LM1B only train and test). Note that
MDLM's code evaluates the *validation* split of WikiText and PTB (``dataloader.py``:
``validation_split = 'test'`` only for text8/lm1b/ag_news); pass ``split="validation"`` to match.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from maskdiff.apps.zeroshot.datasets import ZeroShotDataset, get_dataset
from maskdiff.data.hf import import_datasets, resolve_local_files

__all__ = ["load_rows"]

_SPLIT_WORDS = {
    "test": ("test", "heldout"),
    "validation": ("validation", "valid", "val", "dev"),
    "train": ("train", "training"),
}
_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_IGNORED_SUFFIXES = (".md", ".py", ".lock", ".duckdb", ".yaml", ".yml", ".sha256", ".gitattributes")


def _file_format(path: Path) -> str:
    """``datasets`` builder for a file: parquet/json/csv/arrow by suffix, else plain text lines."""
    name = path.name.lower()
    for comp in _COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    return _FORMATS.get(os.path.splitext(name)[1], "text")


def _names_split(relative: Path, split: str) -> bool:
    words = set(re.split(r"[^a-z]+", str(relative).lower()))
    return any(w in words for w in _SPLIT_WORDS.get(split, (split,)))


def _local_files(spec: ZeroShotDataset, path: str | os.PathLike[str], split: str) -> list[Path]:
    """The data files named by ``path``; in a folder, those of ``split`` (see the module docs)."""

    root = Path(path).expanduser()
    files = resolve_local_files(root)  # a file, a glob or a folder (recursive); raises if empty
    if not root.is_dir():
        return files
    if spec.config and (root / spec.config).is_dir():
        root = root / spec.config
        files = [f for f in files if root in f.parents]
    files = [f for f in files if not f.name.lower().endswith(_IGNORED_SUFFIXES) and f.name.lower() != "license"]
    chosen = [f for f in files if _names_split(f.relative_to(root), split)]
    if not chosen:
        words = "/".join(_SPLIT_WORDS.get(split, (split,)))
        raise FileNotFoundError(
            f"{spec.title}: no file of split {split!r} under {str(path)!r} (looked for names containing "
            f"{words}); pass the file itself as path=. Accepted forms: {spec.local_forms}"
        )
    return chosen


def _open_local(spec: ZeroShotDataset, files: list[Path]) -> Any:
    datasets = import_datasets()

    kinds = {_file_format(f) for f in files}
    if len(kinds) != 1:
        raise ValueError(f"{spec.title}: the files mix formats {sorted(kinds)}: {[str(f) for f in files]}")
    builder = kinds.pop()
    kwargs: dict[str, Any] = {"data_files": [str(f) for f in files], "split": "train", "streaming": True}
    if builder == "text":
        kwargs["keep_linebreaks"] = spec.keep_linebreaks
    return datasets.load_dataset(builder, **kwargs), builder


def _open_hub(spec: ZeroShotDataset, split: str, cache_dir: str | None, revision: str | None,
              streaming: bool) -> Any:
    datasets = import_datasets()

    if spec.parquet_export:
        return datasets.load_dataset("parquet", data_files={split: spec.hub_parquet_glob(split)}, split=split,
                                     cache_dir=cache_dir, streaming=streaming)
    return datasets.load_dataset(spec.hub_id, spec.config, split=split, cache_dir=cache_dir, revision=revision,
                                 streaming=streaming)


class _ColumnError(ValueError):
    """The text column is missing."""


def _pick_column(spec: ZeroShotDataset, columns: Iterable[str], text_column: str | None) -> str:
    columns = list(columns)
    candidates = [text_column] if text_column else [spec.text_column, "text"]
    for c in candidates:
        if c in columns:
            return c
    raise _ColumnError(
        f"{spec.title}: no column {' or '.join(repr(c) for c in candidates)} in the data (columns "
        f"{sorted(columns)}); pass text_column=<name>"
    )


def _hub_error(spec: ZeroShotDataset, split: str, e: BaseException) -> RuntimeError:
    offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    where = spec.hub_parquet_glob(split) if spec.parquet_export else f"{spec.hub_id} ({spec.config})"
    return RuntimeError(
        f"could not load {spec.title} split {split!r} from the Hugging Face Hub ({where}): {type(e).__name__}: {e}. "
        + ("Hub access is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). " if offline else "")
        + f"Download the data elsewhere and pass path=<file or folder> (command line: --path {spec.key}=FILE). "
        f"Accepted forms: {spec.local_forms}."
    )


def load_rows(
    name: str | ZeroShotDataset,
    *,
    path: str | os.PathLike[str] | None = None,
    split: str | None = None,
    text_column: str | None = None,
    max_rows: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    streaming: bool = True,
) -> tuple[list[str], dict[str, Any]]:
    """The raw rows (before detokenisation) of a zero-shot data set, in order, and their source.

    Reads ``path`` (file, glob or folder; see the module docs) when given, else the Hugging Face
    Hub: streamed by default; ``streaming=False`` downloads the config into ``datasets``' cache
    (``cache_dir``, default its own), which later offline runs reuse. ``revision`` pins a Hub
    revision (Parquet repositories only). ``max_rows`` reads only the first rows. A missing value
    in the text column counts as an empty row.

    Raises:
        RuntimeError: the Hub could not be reached (offline) and no ``path`` was given — the
            message names the ``path=`` option and the file forms it accepts.
    """
    spec = name if isinstance(name, ZeroShotDataset) else get_dataset(name)
    split = split or spec.default_split
    if split not in spec.splits:
        raise ValueError(f"{spec.title} has splits {list(spec.splits)}, not {split!r}")

    def read(ds: Any) -> tuple[list[str], str | None]:
        rows: list[str] = []
        column = None
        for batch in ds.iter(batch_size=1024):
            if column is None:
                column = _pick_column(spec, batch.keys(), text_column)
            texts = batch[column]
            if max_rows is not None:
                texts = texts[: max_rows - len(rows)]
            rows.extend("" if t is None else str(t) for t in texts)
            if max_rows is not None and len(rows) >= max_rows:
                break
        return rows, column

    if path is not None:
        files = _local_files(spec, path, split)
        ds, builder = _open_local(spec, files)
        source: dict[str, Any] = {"kind": "local", "files": [str(f) for f in files], "format": builder}
        rows, column = read(ds)
    else:
        try:  # a streamed data set meets the network only while it is read
            rows, column = read(_open_hub(spec, split, None if cache_dir is None else str(cache_dir), revision,
                                          streaming))
        except _ColumnError:
            raise
        except Exception as e:  # network, offline mode, missing cache: many exception types
            raise _hub_error(spec, split, e) from e
        source = {"kind": "hub", "hub_id": spec.hub_id, "config": spec.config, "revision": revision,
                  "parquet_export": spec.parquet_export, "streaming": streaming}
    source["split"] = split
    if path is not None and source["format"] == "text":
        # Plain-text lines as the Hub builders made them: WikiText rows keep the line break and
        # a blank line is ""; PTB and LM1B lines are stripped.
        rows = [r if r.strip() else "" for r in rows] if spec.keep_linebreaks else [r.strip() for r in rows]
    source["column"] = column
    source["n_rows"] = len(rows)
    return rows, source
