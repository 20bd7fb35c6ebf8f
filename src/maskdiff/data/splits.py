"""The common corpus return type, :class:`TokenSplits`, and the split rules.

``TokenSplits`` and :class:`~maskdiff.data.image_splits.ImageSplits` share one small interface,
so the trainer needs no text/image branches: ``name``, ``vocab_size``, ``split()``, ``sizes()``,
``summary()``, ``meta()``, ``image_shape``, ``num_classes``, ``shard_for()``, ``draw()`` and
``check_eval_splits()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from maskdiff.data.batches import num_eval_chunks, random_crops, shard, unigram_entropy_bits
from maskdiff.data.errors import DataError
from maskdiff.data.tokenizers import Tokenizer

__all__ = ["TokenSplits", "SPLIT_NAMES", "split_90_5_5", "split_by_fraction", "check_fractions"]

SPLIT_NAMES = ("train", "validation", "test")


@dataclass
class TokenSplits:
    """A tokenised corpus cut into train / validation / test token streams.

    Attributes:
        name: corpus name, e.g. ``"wiki-char"``.
        vocab_size: number of token ids (ids lie in ``[0, vocab_size)``; no mask id).
        tokenizer: the tokenizer that produced the ids (``encode``/``decode``).
        train, validation, test: 1-D integer token streams of shape ``(n_split,)``,
            ``uint8`` (char corpora) or ``uint16`` (GPT-2), possibly read-only views of a
            ``np.memmap``. Consecutive documents are separated by the tokenizer's
            end-of-text id where the corpus has one.
        metadata: build information (source, cache files, ``from_cache``, timings, ...).
    """

    name: str
    vocab_size: int
    tokenizer: Tokenizer
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in SPLIT_NAMES:
            arr = getattr(self, split)
            if arr.ndim != 1 or arr.dtype.kind not in "ui":
                raise ValueError(
                    f"TokenSplits.{split} must be a 1-D integer array, got shape "
                    f"{arr.shape} and dtype {arr.dtype}"
                )

    def split(self, name: str) -> np.ndarray:
        """Token stream of split ``name`` (``"train"``, ``"validation"``/``"val"``, ``"test"``)."""
        key = {"val": "validation", "valid": "validation"}.get(name, name)
        if key not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, key)

    def sizes(self) -> dict[str, int]:
        """Number of tokens in each split."""
        return {s: int(getattr(self, s).shape[0]) for s in SPLIT_NAMES}

    def summary(self) -> str:
        """One line with the size of each split, e.g. for printing at start-up."""
        sizes = self.sizes()
        parts = " | ".join(f"{s} {n:,}" for s, n in sizes.items())
        dtype = self.train.dtype
        return (
            f"{self.name} (vocab {self.vocab_size}, {dtype}): {parts} tokens "
            f"(total {sum(sizes.values()):,})"
        )

    # The data interface shared with ImageSplits (the trainer calls only these).

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """None: text has no image shape (``ImageSplits.image_shape`` is ``(H, W, C)``)."""
        return None

    @property
    def num_classes(self) -> int:
        """0: text corpora have no class labels."""
        return 0

    def meta(self) -> dict[str, Any]:
        """What a run's ``meta.json`` records beyond :meth:`sizes`: nothing for text (``{}``)."""
        return {}

    def shard_for(self, stream: int, n_streams: int, seq_len: int) -> np.ndarray:
        """The training shard of stream ``stream`` of ``n_streams``, for :meth:`draw`.

        It is :func:`~maskdiff.data.batches.shard` of the training stream: a contiguous 1-D view
        ``(n,)``; the shards of all streams in order are exactly the training stream and their
        sizes differ by at most one token.

        Raises:
            ValueError: the shard holds fewer than ``seq_len`` tokens (no crop fits).
        """
        s = shard(self.train, stream, n_streams)
        if len(s) < seq_len:
            raise ValueError(f"training shard {stream} holds {len(s)} tokens, fewer than data.seq_len={seq_len}")
        return s

    def draw(
        self, shard: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A training batch from a :meth:`shard_for` shard: :func:`~maskdiff.data.batches.random_crops` of it.

        ``batch_size`` windows of ``seq_len`` tokens at uniform offsets, from one
        ``torch.randint`` on ``generator`` (so a restored generator continues the stream).

        Returns:
            ``(x, None)``: ``x`` int64 ``(batch_size, seq_len)`` on the CPU; text has no labels.
        """
        return random_crops(shard, batch_size, seq_len, generator), None

    def check_eval_splits(self, seq_len: int, splits: Sequence[str] = ("validation", "test")) -> None:
        """Check, before any work, that each of ``splits`` holds at least one chunk of ``seq_len`` tokens.

        :func:`~maskdiff.data.sources.load_data` calls it for all three splits (``"train"`` too: a
        crop must fit); the trainer and evaluation may call it for the splits they will score.

        Raises:
            DataError: one line naming the corpus and its file, the split, its length, ``data.seq_len``
                and the largest ``data.seq_len`` every checked split could hold.
        """
        sizes = {s: len(self.split(s)) for s in splits}
        short = [s for s in splits if sizes[s] < seq_len]
        if not short:
            return
        s, fit = short[0], min(sizes.values())
        fix = f"set data.seq_len to at most {fit} or use a larger corpus" if fit > 0 else "use a larger corpus"
        raise DataError(
            f"{describe_source(self.name, self.metadata)}: the {s} split holds {sizes[s]:,} tokens, fewer than "
            f"one chunk of data.seq_len={seq_len}: {fix}"
        )

    def num_eval_sequences(self, split: str, seq_len: int) -> int:
        """How many sequences an evaluation of ``split`` scores: its whole chunks of ``seq_len`` tokens."""
        return num_eval_chunks(self.split(split), seq_len)

    def baseline_bits(self, split: str, n_sequences: int | None = None) -> dict[str, float]:
        """The context-free baseline of ``split``: ``{"unigram_bits_per_token": H}``, the
        cross-entropy of the whole split under a unigram fitted on train (add-one smoothing).
        ``n_sequences`` is accepted for a common interface; text baselines use the whole split."""
        return {"unigram_bits_per_token": unigram_entropy_bits(self.train, self.split(split), self.vocab_size)}


def describe_source(name: str, metadata: dict[str, Any]) -> str:
    """``"name (file)"`` for messages: the data's name and where it was read from, when known."""
    src = metadata.get("location", metadata.get("source"))
    return f"{name} ({src})" if isinstance(src, str) and src else name


def split_90_5_5(n: int) -> tuple[int, int]:
    """Split points of the 90/5/5 rule for a stream of ``n`` tokens.

    ``train = [0, n*9//10)``, ``validation = [n*9//10, n*9//10 + n//20)``, ``test`` = the
    rest (so rounding leftovers go to test). Integer arithmetic only; for text8's
    100,000,000 characters this is exactly the standard 90M / 5M / 5M split.

    Returns:
        ``(end_of_train, end_of_validation)``.
    """
    n_train = n * 9 // 10
    n_val = n // 20
    return n_train, n_train + n_val


def split_by_fraction(
    tokens: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    *,
    boundary_token: int | None = None,
    search_window: int = 1 << 20,
) -> tuple[int, int]:
    """Split points that put the last ``test_fraction`` / the ``val_fraction`` before it aside.

    ``n_test = floor(n * test_fraction)``, ``n_val = floor(n * val_fraction)`` and the nominal
    split points are ``n - n_test - n_val`` and ``n - n_test``. With ``boundary_token`` (the
    end-of-text id) each nominal point moves forward to the next occurrence of that token,
    so no document straddles two splits; the separator then starts the following split.
    If no separator follows a nominal point the split point becomes ``n`` (empty later
    split); only ``search_window``-sized blocks are read at a time, so this is cheap on a
    memory map.

    Returns:
        ``(end_of_train, end_of_validation)``.
    """
    check_fractions(val_fraction, test_fraction)
    n = int(tokens.shape[0])
    n_test = int(n * test_fraction)
    n_val = int(n * val_fraction)
    a, b = n - n_test - n_val, n - n_test
    if boundary_token is None:
        return a, b
    a = _next_token(tokens, a, boundary_token, search_window)
    b = max(a, _next_token(tokens, b, boundary_token, search_window))
    return a, b


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions are in ``[0, 1)`` and leave some training data."""
    for what, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{what} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 (got {val_fraction} + {test_fraction}); "
            "nothing would be left for training"
        )


def _next_token(tokens: np.ndarray, start: int, token: int, window: int) -> int:
    """Index of the first ``token`` at or after ``start`` (``len(tokens)`` if none)."""
    n = int(tokens.shape[0])
    pos = start
    while pos < n:
        block = np.asarray(tokens[pos : pos + window])
        hits = np.flatnonzero(block == token)
        if hits.size:
            return pos + int(hits[0])
        pos += window
    return n
