"""Unit conversions and Monte Carlo summaries: the one place where nats become bits or perplexity.

The objectives return nats per sequence. For sequences of L tokens:

* nats per token      = nats / L
* bits per token      = nats / (L · ln 2)   (bits per character on text8, bits per dimension on images)
* perplexity          = exp(nats per token)  (word-piece text)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["nats_to_bits", "bits_per_token", "perplexity", "MeanEstimate", "mean_estimate"]

LN2 = math.log(2.0)


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
        half = 1.959963984540054 * self.stderr
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
