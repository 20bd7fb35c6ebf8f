"""A run's data from its ``data`` settings: one function for the trainer, evaluation and plots.

:func:`load_data` returns a text corpus (:class:`~maskdiff.data.splits.TokenSplits`) or an image
set (:class:`~maskdiff.data.image_splits.ImageSplits`); :func:`tokenizer_for` names a corpus's tokenizer.
"""

from __future__ import annotations

import os

from maskdiff.data.corpora import load_corpus
from maskdiff.data.image_splits import ImageSplits
from maskdiff.data.images import IMAGE_DATASETS, load_images
from maskdiff.data.splits import TokenSplits
from maskdiff.data.tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer

__all__ = ["CHAR_CORPORA", "load_data", "tokenizer_for"]

# Corpora whose tokens are characters (every other text corpus uses GPT-2 tokens).
CHAR_CORPORA = ("wiki-char", "text8")

PathLike = str | os.PathLike[str]


def load_data(corpus: str, *, seq_len: int, path: PathLike | None = None,
              cache_dir: PathLike | None = None) -> TokenSplits | ImageSplits:
    """The run's data: a text corpus (token streams) or an image set (one row per image).

    For image sets ``seq_len`` must equal H·W·C; a mismatch raises ValueError naming the value to set.
    """
    if corpus.lower() in IMAGE_DATASETS:
        data = load_images(corpus, path=path)
        if seq_len != data.seq_len:
            raise ValueError(
                f"{corpus} images have {data.seq_len} values (H·W·C = {data.shape}); set data.seq_len={data.seq_len}"
            )
        return data
    return load_corpus(corpus, path=path, cache_dir=cache_dir)


def tokenizer_for(corpus: str) -> Tokenizer:
    """The tokenizer of a text corpus: characters for wiki-char/text8, GPT-2 BPE otherwise."""
    if corpus in CHAR_CORPORA:
        return CharTokenizer()
    return GPT2Tokenizer()
