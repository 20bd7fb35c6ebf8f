"""Context-free baselines a model must beat, in bits per token of the same split.

* text: :func:`maskdiff.data.batches.unigram_entropy_bits` (a unigram fitted on train);
* images: :func:`histogram_bits_per_dim`, one grey-level histogram per sub-pixel position (and
  one shared by all positions).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ArrayLike", "as_token_array", "histogram_bits_per_dim"]

ArrayLike = np.ndarray | torch.Tensor
_BLOCK_ELEMENTS = 1 << 22  # ids per block when counting (bounded memory on memory maps)


def as_token_array(x: ArrayLike, what: str) -> np.ndarray:
    """``x`` (NumPy array or tensor of token ids, any shape) as a NumPy array; TypeError naming
    ``what`` unless it holds integers."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "ui":
        raise TypeError(f"{what} must hold integer token ids, got dtype {x.dtype}")
    return x


def histogram_bits_per_dim(
    train: ArrayLike, test: ArrayLike, vocab_size: int, *, smoothing: float = 1.0
) -> dict[str, float]:
    """Cross-entropy of ``test`` in bits/dim under two "no context" histogram models.

    * ``per_dim``: every dimension (sub-pixel position) ``d`` has its own categorical
      ``p_d(v) = (count_train(d, v) + smoothing) / (N_train + smoothing * V)``;
      result ``-mean_{n, d} log2 p_d(test[n, d])``. This is the baseline an image model must
      beat: it knows, e.g., that MNIST borders are black.
    * ``global``: one shared histogram over all positions,
      ``p(v) = (count_train(v) + smoothing) / (N_train * L + smoothing * V)``.

    ``smoothing=1`` is add-one (Laplace). Arrays are scanned in row blocks, so memory maps of
    any size work.

    Args:
        train: ``(N_train, L)`` ids in ``[0, V)``.
        test: ``(N_test, L)`` ids in ``[0, V)``.
        vocab_size: ``V`` (the smoothing spreads over all of it).

    Returns:
        ``{"per_dim": bits/dim, "global": bits/dim}``.
    """
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    tr, te = as_token_array(train, "train"), as_token_array(test, "test")
    if tr.ndim != 2 or te.ndim != 2 or tr.shape[1] != te.shape[1]:
        raise ValueError(f"train and test must be (N, L) with the same L, got {tr.shape} and {te.shape}")
    if te.shape[0] == 0:
        raise ValueError("test is empty; the cross-entropy is undefined")
    c_tr = _position_counts(tr, vocab_size, "train").astype(np.float64)
    c_te = _position_counts(te, vocab_size, "test").astype(np.float64)
    n_test_tokens = te.shape[0] * te.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_dim = (c_tr + smoothing) / (tr.shape[0] + smoothing * vocab_size)
        g = c_tr.sum(axis=0)
        p_glob = (g + smoothing) / (g.sum() + smoothing * vocab_size)
        per_dim = -np.sum(np.where(c_te > 0, c_te * np.log2(p_dim), 0.0)) / n_test_tokens
        glob = -np.sum(np.where(c_te.sum(0) > 0, c_te.sum(0) * np.log2(p_glob), 0.0)) / n_test_tokens
    return {"per_dim": float(per_dim), "global": float(glob)}


def _position_counts(x: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    """``counts[d, v]`` = number of rows with ``x[:, d] == v``; ``(L, V)`` int64."""
    n, L = x.shape
    counts = np.zeros(L * vocab_size, dtype=np.int64)
    offsets = np.arange(L, dtype=np.int64) * vocab_size
    rows = max(1, _BLOCK_ELEMENTS // max(L, 1))
    for a in range(0, n, rows):
        block = np.asarray(x[a : a + rows], dtype=np.int64)
        if block.size and (block.min() < 0 or block.max() >= vocab_size):
            raise ValueError(f"{what} holds ids outside [0, {vocab_size}) (masks are not allowed here)")
        counts += np.bincount((block + offsets).ravel(), minlength=L * vocab_size)
    return counts.reshape(L, vocab_size)
