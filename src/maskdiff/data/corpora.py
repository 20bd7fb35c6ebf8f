"""One entry point for every corpus: :func:`load_corpus`.

======================  ===========================================================
name                    corpus
======================  ===========================================================
``"wiki-char"``         Wikipedia lead sections, text8 characters (vocab 27)
``"wiki-gpt2"``         the same extracts, GPT-2 BPE (vocab 50257)
``"text8"``             text8 from a user-supplied ``text8``/``text8.zip`` (``path=``)
``"openwebtext"``       OpenWebText via ``datasets`` (Hub, or local files via ``path=``)
``"fineweb"``,          FineWeb / FineWeb-Edu ``sample-10BT`` via ``datasets``
``"fineweb-edu"``
``"hf:<id-or-builder>"``  any ``datasets`` corpus with a text column, e.g.
                        ``"hf:Skylion007/openwebtext"`` or ``"hf:json"`` + ``path=``
``"hf"``                local files given by ``path=`` (format from the suffix)
``"files"``             your own text files (``path=``), with ``tokenizer=`` byte, char, gpt2
                        or a Hugging Face tokenizer, ``records=`` (see :mod:`~maskdiff.data.files`)
======================  ===========================================================
"""

from __future__ import annotations

import os
from typing import Any

from maskdiff.data.errors import DataError
from maskdiff.data.files import load_files
from maskdiff.data.hf import HF_PRESETS, load_hf_corpus
from maskdiff.data.splits import TokenSplits
from maskdiff.data.text8 import load_text8
from maskdiff.data.wiki import load_wiki_char, load_wiki_gpt2

__all__ = ["load_corpus", "CORPUS_NAMES"]

CORPUS_NAMES = ("wiki-char", "wiki-gpt2", "text8", *HF_PRESETS, "hf", "hf:<dataset>", "files")


def load_corpus(
    name: str,
    *,
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> TokenSplits:
    """Load a corpus by name as train / validation / test token streams.

    Args:
        name: one of :data:`CORPUS_NAMES` (see the module docstring).
        path: the corpus source where one is needed or wanted: a summaries JSON
            (wiki-*), ``text8``/``text8.zip`` (text8), data files / glob / directory (HF).
        cache_dir: cache directory; default ``$MASKDIFF_CACHE`` or ``~/.cache/maskdiff``.
        **kw: loader-specific options, e.g. ``rebuild=True`` (wiki-*, HF), ``progress``,
            and for HF corpora ``text_column``, ``val_fraction``, ``test_fraction``,
            ``max_documents``, ``config``, ``split``, ``streaming``
            (see :func:`~maskdiff.data.hf.load_hf_corpus`).

    Returns:
        :class:`~maskdiff.data.splits.TokenSplits`.

    Raises:
        ValueError: unknown corpus name.
    """
    if name == "wiki-char":
        return load_wiki_char(path=path, cache_dir=cache_dir, **kw)
    if name == "wiki-gpt2":
        return load_wiki_gpt2(path=path, cache_dir=cache_dir, **kw)
    if name == "text8":
        return load_text8(path=path, cache_dir=cache_dir, **kw)
    if name == "files":
        return load_files(path, cache_dir=cache_dir, **kw)
    if name in HF_PRESETS:
        preset = dict(HF_PRESETS[name])
        if path is not None:  # a local copy replaces the Hub id and its config
            preset.pop("source", None)
            preset.pop("config", None)
        opts = {**preset, **kw}
        opts.setdefault("name", name)
        return load_hf_corpus(path=path, cache_dir=cache_dir, **opts)
    if name == "hf" or name.startswith("hf:"):
        source = name[3:] or None
        if source is None and path is None:
            raise DataError(
                "data.corpus='hf' reads local files: set data.path=<file, glob or directory> "
                "(load_corpus('hf') needs path=...)"
            )
        return load_hf_corpus(source, path=path, cache_dir=cache_dir, **kw)
    raise ValueError(f"unknown corpus {name!r}; expected one of {', '.join(CORPUS_NAMES)}")
