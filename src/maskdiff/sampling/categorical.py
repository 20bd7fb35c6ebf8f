"""Logit transforms and categorical draws: exact float64 inverse-CDF and the float32 reference.

See the package docstring (:mod:`maskdiff.sampling`, "Exact categorical draws") and
docs/math.md, "Exact (float64) categorical draws" and "Temperature, top-k and top-p".
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DRAW_CHUNK_ELEMENTS",
    "FLOAT32_GUMBEL_MAX",
    "Precision",
    "transform_logits",
    "sample_categorical",
    "gumbel_max_float32",
]

#: Largest Gumbel noise the float32 reference draw can produce: -log(-log(1 - 2^-24)) ≈ 16.64.
FLOAT32_GUMBEL_MAX = -math.log(-math.log1p(-(2.0**-24)))

Precision = Literal["float64", "float32"]

#: Rows × outcomes per chunk of a reverse step's draws (2**24: 64 MiB in float32, 128 MiB in
#: float64), so that a step never holds (N, V) buffers for all N masked positions at once. Read at
#: each call; a step with N · V below it runs in one chunk (bench/bench_memory.py sets it huge to
#: measure the unchunked path).
DRAW_CHUNK_ELEMENTS = 2**24


def _row_chunks(n: int, width: int) -> list[slice]:
    """Slices of ``range(n)`` with about :data:`DRAW_CHUNK_ELEMENTS` // ``width`` rows each."""
    size = max(1, DRAW_CHUNK_ELEMENTS // max(1, width))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _check_logit_rows(logits: Tensor) -> None:
    """Raise ValueError if rows (N, V) of denoiser logits hold NaN or +inf or are -inf everywhere.

    No token could be drawn from such a row (softmax gives NaN); without this check the draw
    would silently return the last token, V - 1.
    """
    if logits.numel() == 0 or bool(torch.isfinite(logits).all()):
        return
    problems = {
        "hold NaN": int(torch.isnan(logits).any(-1).sum()),
        "hold +inf": int(torch.isposinf(logits).any(-1).sum()),
        "are -inf for every token": int((logits == -math.inf).all(-1).sum()),
    }
    found = [f"{what} at {count} masked position(s)" for what, count in problems.items() if count]
    if found:
        raise ValueError(
            f"the denoiser's logits {' and '.join(found)}: no token can be drawn there "
            "(check the network's output, e.g. for a diverged model)"
        )


def _check_precision(precision: str) -> None:
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' (exact) or 'float32' (reference Gumbel-max), got {precision!r}")


def _check_transform_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number ≥ 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int ≥ 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def transform_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Apply temperature, then top-k, then top-p (nucleus) filtering to logits (..., V).

    * temperature τ: logits / τ; τ = 0 is greedy (only the argmax keeps a finite logit).
    * top-k: keep exactly the k largest logits per row (ties broken by ``torch.topk``).
    * top-p: keep the smallest set of most likely tokens whose probability reaches p: token
      i (sorted by decreasing probability) is kept iff the mass of the tokens before it is < p,
      so the most likely token is always kept.

    Removed tokens get logit -inf. The dtype of ``logits`` is kept; compute in float64 for
    exact sampling.
    """
    _check_transform_args(temperature, top_k, top_p)
    x = logits
    v = x.shape[-1]
    if temperature == 0:
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.argmax(-1, keepdim=True), True)
        return x.masked_fill(~keep, -math.inf)
    if temperature != 1.0:
        x = x / temperature
    if top_k is not None and top_k < v:
        idx = torch.topk(x, top_k, dim=-1).indices
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
        x = x.masked_fill(~keep, -math.inf)
    if top_p is not None and top_p < 1.0:
        probs = _softmax(x)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        x = x.masked_fill(~keep, -math.inf)
    return x


def _softmax(x: Tensor) -> Tensor:
    """softmax over the last dim as exp(x - max) / Σ exp(x - max), in the dtype of x.

    Written out rather than ``torch.softmax``: on CPU the fused kernel wakes its thread pool
    even for a few rows, which costs milliseconds per step on a busy machine.
    """
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Draw category indices by inverse CDF: weights (..., K) ≥ 0 (unnormalised), u (..., n) in [0, 1).

    Returns (..., n): index i with cdf_{i-1} ≤ u·total < cdf_i, so a zero-weight category is
    never drawn. If rounding puts u·total at or above the total, the last category with
    positive weight is returned.
    """
    cdf = weights.cumsum(-1)
    total = cdf[..., -1:]
    idx = torch.searchsorted(cdf, (u * total).contiguous(), right=True)
    k = weights.shape[-1]
    last_positive = (k - 1) - (weights > 0).flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
    return torch.minimum(idx, last_positive)


def gumbel_max_float32(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The reference code's float32 categorical draw: argmax over the last dim of logits + g.

    g = -log(-log u) with u ~ U[0, 1) drawn in float32 (24 random bits) and clipped to
    [finfo(float32).tiny, 1 - 2^-24], so g ∈ [-4.47, 16.64]: outcomes far in the tail are
    truncated (see :mod:`maskdiff.sampling`). Provided to compare against the exact float64 draw.
    Shapes: logits (..., K) → (...).
    """
    x = logits.to(torch.float32)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    u.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - 2.0**-24)
    # In place: g = -log(-log u), then logits + g.
    u.log_().neg_().log_().neg_().add_(x)
    return u.argmax(-1)


def sample_categorical(
    probs: Tensor,
    *,
    generator: torch.Generator | None = None,
    precision: Precision = "float64",
    num_samples: int | None = None,
) -> Tensor:
    """Draw from the categorical distributions in the rows of ``probs`` (..., K).

    Rows must be non-negative with positive sum (they are normalised here).
    ``precision="float64"``: inverse CDF with float64 probabilities and a float64 uniform;
    exact up to float64 rounding. ``"float32"``: the reference float32 Gumbel-max draw
    (:func:`gumbel_max_float32` on log p), which truncates the tail.
    Returns (...) or, with ``num_samples=n``, (..., n) independent draws per row.
    """
    _check_precision(precision)
    if probs.dim() < 1 or probs.shape[-1] < 1:
        raise ValueError(f"probs must have shape (..., K) with K ≥ 1, got {tuple(probs.shape)}")
    p = probs.to(torch.float64)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("probs must be finite and non-negative")
    if bool((p.sum(-1) <= 0).any()):
        raise ValueError("every row of probs needs positive total probability")
    n = 1 if num_samples is None else int(num_samples)
    if n < 1:
        raise ValueError(f"num_samples must be ≥ 1, got {num_samples!r}")
    if precision == "float64":
        u = torch.rand(p.shape[:-1] + (n,), generator=generator, device=p.device, dtype=torch.float64)
        out = _inverse_cdf(p, u)
    else:
        logp = torch.log(p / p.sum(-1, keepdim=True)).to(torch.float32)
        out = torch.stack([gumbel_max_float32(logp, generator) for _ in range(n)], dim=-1)
    return out[..., 0] if num_samples is None else out


def _mu64(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """μ = softmax(transform(logits)) in float64, rows (N, V)."""
    x = transform_logits(logits.to(torch.float64), temperature=temperature, top_k=top_k, top_p=top_p)
    return _softmax(x)
