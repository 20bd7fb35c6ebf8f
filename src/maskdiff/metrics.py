"""Unit conversions and Monte Carlo summaries: the one place where nats become bits or perplexity.

The objectives return nats per sequence. For sequences of L tokens:

* nats per token      = nats / L
* bits per token      = nats / (L · ln 2)   (bits per character on text8, bits per dimension on images)
* perplexity          = exp(nats per token)  (word-piece text)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LN2",
    "Z95",
    "nats_to_bits",
    "bits_per_token",
    "perplexity",
    "MeanEstimate",
    "mean_estimate",
    "ratio_estimate",
    "eval_seed",
]

LN2 = math.log(2.0)
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: 95% intervals are mean ± Z95 · stderr


def nats_to_bits(nats: float | Tensor) -> float | Tensor:
    """Convert nats to bits (divide by ln 2)."""
    return nats / LN2


def bits_per_token(nats_per_sequence: float | Tensor, tokens_per_sequence: int) -> float | Tensor:
    """Bits per token from nats per sequence of ``tokens_per_sequence`` tokens."""
    if tokens_per_sequence < 1:
        raise ValueError(f"tokens_per_sequence must be positive, got {tokens_per_sequence}")
    return nats_per_sequence / (tokens_per_sequence * LN2)


def perplexity(nats_per_token: float | Tensor) -> float | Tensor:
    """Perplexity exp(nats per token)."""
    if isinstance(nats_per_token, Tensor):
        return torch.exp(nats_per_token)
    return math.exp(nats_per_token)


@dataclass(frozen=True)
class MeanEstimate:
    """A Monte Carlo mean with its standard error and normal 95% interval."""

    mean: float
    stderr: float
    n: int

    @property
    def ci95(self) -> tuple[float, float]:
        half = Z95 * self.stderr
        return (self.mean - half, self.mean + half)

    def scaled(self, factor: float) -> "MeanEstimate":
        """The same estimate in other units (e.g. nats per sequence → bits per token)."""
        return MeanEstimate(self.mean * factor, self.stderr * abs(factor), self.n)


def mean_estimate(values: Tensor) -> MeanEstimate:
    """Mean and standard error (sample std / √n) of independent draws ``values`` (any shape)."""
    v = values.detach().double().flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("cannot estimate a mean from zero values")
    stderr = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("inf")
    return MeanEstimate(float(v.mean()), stderr, n)


def ratio_estimate(sums: Tensor | Sequence[float], counts: Tensor | Sequence[float]) -> MeanEstimate:
    """The token-weighted mean R = Σ S_i / Σ n_i with the ratio estimator's standard error.

    ``sums[i]`` is a total over unit i (e.g. nats of one sequence), ``counts[i]`` how many tokens
    it covers; the units are the independent draws. se = sqrt(Σ (S_i − R n_i)² / (N (N − 1))) / mean(n)
    (docs/math.md, "Token-weighted averages: the ratio estimator"). With equal counts it equals
    :func:`mean_estimate` of S_i / n_i. One unit gives an infinite standard error.
    """
    s = torch.as_tensor(sums, dtype=torch.float64).flatten()
    n = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if s.numel() != n.numel():
        raise ValueError(f"sums and counts differ in length ({s.numel()} vs {n.numel()})")
    if s.numel() == 0 or float(n.sum()) <= 0:
        raise ValueError("cannot estimate a ratio from zero units or zero tokens")
    r = float(s.sum() / n.sum())
    k = s.numel()
    if k < 2:
        return MeanEstimate(r, float("inf"), k)
    resid = s - r * n
    se = math.sqrt(float((resid**2).sum()) / (k * (k - 1))) / float(n.mean())
    return MeanEstimate(r, se, k)


def eval_seed(seed: int, index: int) -> int:
    """The seed of evaluation batch ``index`` under run seed ``seed``: each batch's draws are
    independent of the order and number of batches before it."""
    return seed * 1_000_003 + index
