"""A run's data from its ``data`` settings: one function for the trainer, evaluation and plots.

:func:`load_data` returns a text corpus (:class:`~maskdiff.data.splits.TokenSplits`) or an image
set (:class:`~maskdiff.data.image_splits.ImageSplits`); :func:`tokenizer_for` names a corpus's tokenizer.
"""

from __future__ import annotations

import os

from maskdiff.data.corpora import load_corpus
from maskdiff.data.errors import DataError
from maskdiff.data.image_splits import ImageSplits
from maskdiff.data.images import IMAGE_DATASETS, load_images
from maskdiff.data.splits import SPLIT_NAMES, TokenSplits
from maskdiff.data.tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer

__all__ = ["CHAR_CORPORA", "load_data", "tokenizer_for"]

# Corpora whose tokens are characters (every other text corpus uses GPT-2 tokens).
CHAR_CORPORA = ("wiki-char", "text8")

PathLike = str | os.PathLike[str]


def load_data(corpus: str, *, seq_len: int, path: PathLike | None = None,
              cache_dir: PathLike | None = None, val_size: int | None = None,
              check_splits: bool = True, tokenizer: str | None = None, records: str | None = None,
              vocabulary: Tokenizer | None = None) -> TokenSplits | ImageSplits:
    """The run's data: a text corpus (token streams) or an image set (one row per image).

    Every problem found here is one line naming the file or ``data.*`` key and the fix (a
    ``ValueError``, ``FileNotFoundError`` or ``RuntimeError``), before any training or evaluation.

    Args:
        corpus, path, cache_dir: the run's ``data.corpus``, ``data.path``, ``data.cache_dir``.
        seq_len: ``data.seq_len``; for image sets it must equal H·W·C.
        val_size: ``data.val_size``: images held out of training for validation (cifar10,
            imagenet64 only; None: the data set's standard 5,000 / 10,000).
        check_splits: check that every split holds at least one chunk of ``seq_len`` tokens (one
            image) with :meth:`~maskdiff.data.splits.TokenSplits.check_eval_splits`.
        tokenizer, records: ``data.tokenizer`` and ``data.records`` (``data.corpus=files`` only; see
            :mod:`maskdiff.data.files`).
        vocabulary: ``files`` only: encode with this tokenizer (a run's stored one) instead of the
            one ``tokenizer`` names or builds.

    Raises:
        DataError (a ValueError): malformed files, a split shorter than one chunk, a setting that
            does not apply to ``corpus``; FileNotFoundError: ``data.path`` names nothing.
    """
    key = corpus.lower()
    image = key in IMAGE_DATASETS
    _check_settings(corpus, key, image, path, val_size)
    _check_file_settings(corpus, key, path, tokenizer, records, vocabulary)
    try:
        if key == "files":
            data = load_corpus("files", path=path, cache_dir=cache_dir, tokenizer=tokenizer, records=records,
                               seq_len=seq_len, vocabulary=vocabulary)
        elif image:
            kwargs = {} if key in _BUNDLED_IMAGES else {"cache_dir": cache_dir}
            if val_size is not None:
                kwargs["val_size"] = val_size
            data: TokenSplits | ImageSplits = load_images(corpus, path=path, **kwargs)
        else:
            data = load_corpus(corpus, path=path, cache_dir=cache_dir)
    except (PermissionError, IsADirectoryError, NotADirectoryError) as e:  # a bare OSError names no key
        raise DataError(
            f"{e.filename or path}: {e.strerror or e} (while loading data.corpus={corpus!r}): check data.path and "
            "data.cache_dir and their permissions"
        ) from e
    data.check_eval_splits(seq_len, SPLIT_NAMES if check_splits else ())  # images: seq_len = H·W·C always
    return data


_BUNDLED_IMAGES = ("mnist", "digits", "digits256")  # shipped in installed packages: no path


def _check_settings(corpus: str, key: str, image: bool, path: PathLike | None, val_size: int | None) -> None:
    """Settings that do not apply to ``corpus`` are refused, not silently ignored."""
    if path is not None and key in _BUNDLED_IMAGES:
        raise DataError(
            f"data.path={str(path)!r} is not used by data.corpus={corpus!r} (its images ship in an installed "
            "package): remove data.path"
        )
    if val_size is not None and not (image and key not in _BUNDLED_IMAGES):
        raise DataError(
            f"data.val_size={val_size!r} applies only to cifar10 and imagenet64 (held-out validation images), "
            f"not to data.corpus={corpus!r}: remove data.val_size"
        )


def _check_file_settings(corpus: str, key: str, path: PathLike | None, tokenizer: str | None, records: str | None,
                         vocabulary: Tokenizer | None) -> None:
    """``data.tokenizer``/``data.records`` belong to ``data.corpus=files``, which needs ``data.path``."""
    if key != "files":
        given = [k for k, v in (("data.tokenizer", tokenizer), ("data.records", records)) if v is not None]
        if given or vocabulary is not None:
            what = " and ".join(given) or "a stored vocabulary"
            raise DataError(f"{what} apply only to data.corpus=files (your own text files), not to "
                            f"data.corpus={corpus!r}: remove {' and '.join(given) or 'it'}")
    elif path is None:
        raise DataError("data.corpus=files reads your own text files: set data.path=<a file, a glob such as "
                        "'texts/*.txt', or a folder>")


def tokenizer_for(corpus: str) -> Tokenizer:
    """The tokenizer of a text corpus: characters for wiki-char/text8, GPT-2 BPE otherwise.

    A ``data.corpus=files`` run keeps its tokenizer in its run folder (``tokenizer.json``, read by
    ``maskdiff.load(run).tokenizer``); asking for it here is an error that says so.
    """
    if corpus.lower() == "files":
        raise DataError("the tokenizer of a data.corpus=files run is stored in its run folder (tokenizer.json): "
                        "use maskdiff.load(RUN).tokenizer or maskdiff.data.read_run_tokenizer(RUN)")
    if corpus in CHAR_CORPORA:
        return CharTokenizer()
    return GPT2Tokenizer()
