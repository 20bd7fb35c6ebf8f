"""Batches from 1-D token streams: random training crops, evaluation chunks, DDP shards.

All functions take a 1-D integer ``np.ndarray`` (a ``np.memmap`` works and is read lazily)
and return CPU ``torch.int64`` tensors; move them to the device in the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["random_crops", "eval_chunks", "num_eval_chunks", "shard", "unigram_entropy_bits"]

_BLOCK = 1 << 24  # tokens per block when scanning (bounded memory on huge memmaps)


def _check_stream(tokens: np.ndarray, what: str = "tokens") -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise TypeError(
            f"{what} must be a 1-D integer numpy array (e.g. TokenSplits.train), got "
            f"{type(tokens).__name__} with shape {getattr(tokens, 'shape', None)} and dtype "
            f"{getattr(tokens, 'dtype', None)}"
        )


def _check_positive(**values: int) -> None:
    for k, v in values.items():
        if not isinstance(v, int | np.integer) or v <= 0:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")


def random_crops(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """Sample ``batch_size`` windows of ``seq_len`` tokens at uniform random offsets.

    Start offsets are drawn uniformly from ``[0, len(tokens) - seq_len]`` (inclusive), so
    every window lies fully inside the stream; windows may overlap and cross document
    separators (standard packed-sequence training).

    Args:
        tokens: 1-D token stream of shape ``(N,)``, ``N >= seq_len``.
        batch_size: ``B``.
        seq_len: ``L``.
        generator: source of randomness (may live on any device); the same generator
            state gives the same batch.

    Returns:
        ``torch.LongTensor`` of shape ``(B, L)`` on the CPU.
    """
    _check_stream(tokens)
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    n = int(tokens.shape[0])
    if n < seq_len:
        raise ValueError(
            f"token stream has {n} tokens, fewer than seq_len={seq_len}; use a shorter seq_len"
        )
    starts = torch.randint(
        0, n - seq_len + 1, (batch_size,), generator=generator, device=generator.device
    )
    # Contiguous slices read only the pages they touch on a memmap.
    rows = [tokens[s : s + seq_len] for s in starts.tolist()]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def num_eval_chunks(tokens: np.ndarray, seq_len: int) -> int:
    """Number of non-overlapping ``seq_len`` chunks :func:`eval_chunks` yields: ``floor(N / L)``."""
    _check_positive(seq_len=seq_len)
    return int(tokens.shape[0]) // seq_len


def eval_chunks(
    tokens: np.ndarray, seq_len: int, batch_size: int, *, max_chunks: int | None = None
) -> Iterator[torch.Tensor]:
    """Iterate over the stream in non-overlapping ``seq_len`` chunks, ``batch_size`` at a time.

    Chunk ``i`` is ``tokens[i*L : (i+1)*L]`` for ``i < floor(N / L)``; the trailing
    ``N mod L`` tokens (an incomplete chunk) are dropped. Every batch has ``batch_size``
    rows except possibly the last, which holds the remaining chunks. Deterministic.

    Args:
        tokens: 1-D token stream of shape ``(N,)``.
        seq_len: ``L``.
        batch_size: chunks per batch.
        max_chunks: stop after the first this-many chunks (None: all).

    Yields:
        ``torch.LongTensor`` of shape ``(b, L)`` with ``b <= batch_size``, on the CPU.
    """
    _check_stream(tokens)
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    n_chunks = num_eval_chunks(tokens, seq_len)
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    for first in range(0, n_chunks, batch_size):
        last = min(first + batch_size, n_chunks)
        block = np.asarray(tokens[first * seq_len : last * seq_len], dtype=np.int64)
        yield torch.from_numpy(block.reshape(last - first, seq_len))


def shard(tokens: np.ndarray, rank: int, world_size: int, *, align: int = 1) -> np.ndarray:
    """The contiguous part of ``tokens`` that DDP rank ``rank`` of ``world_size`` reads.

    Shards partition the stream exactly (their concatenation in rank order is ``tokens``)
    and are views (a memmap stays a memmap). With ``align=1`` shard sizes differ by at most
    one. With ``align=L`` every boundary falls on a multiple of ``L`` (sizes differ by at
    most ``L``, the ``N mod L`` tail goes to the last rank), so running :func:`eval_chunks`
    with ``seq_len=L`` on every shard visits exactly the chunks of the whole stream.

    Args:
        tokens: 1-D token stream of shape ``(N,)``.
        rank: ``0 <= rank < world_size``.
        world_size: number of processes.
        align: boundary granularity in tokens.

    Returns:
        1-D view of ``tokens``.
    """
    _check_stream(tokens)
    _check_positive(world_size=world_size, align=align)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    n = int(tokens.shape[0])
    units = n // align

    def bound(r: int) -> int:
        return n if r == world_size else (r * units // world_size) * align

    return tokens[bound(rank) : bound(rank + 1)]


def _counts(tokens: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, int(tokens.shape[0]), _BLOCK):
        block = np.asarray(tokens[i : i + _BLOCK])
        c = np.bincount(block, minlength=vocab_size)
        if c.shape[0] > vocab_size:
            raise ValueError(f"{what} contain id {int(block.max())} >= vocab_size={vocab_size}")
        counts += c
    return counts


def unigram_entropy_bits(
    train_tokens: np.ndarray,
    eval_tokens: np.ndarray,
    vocab_size: int,
    smoothing: float = 1.0,
) -> float:
    """Cross-entropy (bits/token) of ``eval_tokens`` under a unigram fit to ``train_tokens``.

    ``p(v) = (count_train(v) + smoothing) / (N_train + smoothing * vocab_size)`` (additive /
    Laplace smoothing; ``smoothing=1`` is add-one) and the result is
    ``-mean_{x in eval} log2 p(x)``. Smoothing keeps ids unseen in training finite; with
    ``smoothing=0`` an unseen eval id gives ``inf``. Passing the same array twice with
    ``smoothing=0`` gives the empirical unigram entropy of that split. This is the
    "no context" baseline a sequence model must beat. Streams are scanned in blocks, so
    memmaps of any size work.

    Args:
        train_tokens: 1-D ids of shape ``(N_train,)``, in ``[0, vocab_size)``.
        eval_tokens: 1-D ids of shape ``(N_eval,)``, in ``[0, vocab_size)``.
        vocab_size: size of the id space (the smoothing spreads over all of it).
        smoothing: pseudo-count added to every id (``>= 0``).
    """
    _check_stream(train_tokens, "train_tokens")
    _check_stream(eval_tokens, "eval_tokens")
    _check_positive(vocab_size=vocab_size)
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    if eval_tokens.shape[0] == 0:
        raise ValueError("eval_tokens is empty; the cross-entropy is undefined")
    train = _counts(train_tokens, vocab_size, "train_tokens").astype(np.float64) + smoothing
    if train.sum() <= 0:
        raise ValueError("train_tokens is empty and smoothing=0: the unigram model is undefined")
    ev = _counts(eval_tokens, vocab_size, "eval_tokens")
    with np.errstate(divide="ignore"):
        logp = np.log2(train) - math.log2(train.sum())
    seen = ev > 0
    return float(-(ev[seen] * logp[seen]).sum() / ev.sum())
