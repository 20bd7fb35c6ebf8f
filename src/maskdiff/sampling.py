"""Samplers for masked (absorbing-state) diffusion: MD4 ancestral sampling and its variants.

Conventions (md4-math.md): vocabulary ``{0, …, V-1}``, mask id ``m = V``, time 1 = all masked,
time 0 = clean. A *denoiser* is any callable ``denoiser(z, t) -> logits`` with ``z`` a LongTensor
(B, L) holding the mask id V at masked positions, ``t`` a FloatTensor (B,), and logits (B, L, V);
μ = softmax(logits) is its prediction of the clean token at every position.

The ancestral step (md4-math.md, "Sampling" and "GenMD4")
---------------------------------------------------------
From time t to an earlier time s < t, every masked position independently becomes

    token j  with probability  μ_j · (α_{s,j} - α_{t,j}) / (1 - α_{t,j})          (j < V)
    m        with the remaining mass  1 - Σ_j μ_j (α_{s,j} - α_{t,j}) / (1 - α_{t,j})

and unmasked positions are copied ("carry-over"). For a scalar schedule α_{t,j} = α_t, the
remaining mass is (1 - α_s)/(1 - α_t); a per-token schedule (GenMD4) gives every token j its own
α_{t,j}. Both are one formula here: α is a tensor of shape (B, 1) (scalar) or (B, V) (per token).

Exact categorical draws
-----------------------
``precision="float64"`` (default) draws in two stages, which is the same law as one draw over
the V + 1 outcomes: first *unmask?* with probability P_u = Σ_j μ_j r_j (r_j the fraction above),
then the token j ∝ μ_j r_j, each by inverse CDF with a float64 uniform (53 random bits). Every
probability is represented to float64 rounding, including tokens whose probability μ_j r_j is
far below 2^-24 — the regime of a many-step sampler, where r is about 1/T per step.

``precision="float32"`` reproduces the reference code's draw: ``argmax(log p + g)`` with Gumbel
noise ``g = -log(-log u)`` from a float32 uniform u clipped to ``[tiny, 1 - 2^-24]``. The largest
float32 below 1 is 1 - 2^-24, so g ≤ -log(-log(1 - 2^-24)) ≈ 16.64 (and g ≥ -log(-log(2^-24))
≈ -2.81 except when u = 0): an outcome whose log-probability lies more than about 16.6 below the
competing outcomes' is drawn less often than it should be, or never. That truncates the tail
of the distribution and lowers the effective temperature (Zheng et al., arXiv 2409.02908). (The
JAX reference draws 23-bit uniforms, so its cap is even lower, 23·ln 2 ≈ 15.9.)

Calls to the denoiser
---------------------
* *Lazy evaluation* (``lazy=True``, default, exact for any denoiser): the float64 ancestral step
  first draws which positions unmask; since P_u ≤ max_j r_j, when no uniform falls below
  max_j r_j nothing can change and the denoiser is not called at all. For scalar schedules
  this decides the step exactly without μ.
* *Caching* (``cache=True``, only for time-agnostic denoisers): the output of a denoiser that
  ignores t depends on z alone, so when no token changed since the last call, the previous
  output is reused (md4-math.md: "This caching is exact"). ``cache_scope="row"`` re-evaluates
  only the sequences that changed (bitwise equal to a full call only if the network's output
  for a row does not depend on the batch it is computed in).

Both only skip calls; the random numbers consumed do not depend on them, so samples with the
same generator are identical with and without either.

Conditioning
------------
``fixed`` (LongTensor (B or 1, L)) holds a token id at every fixed position and ``FREE`` (-1) or
the mask id at free positions. Fixed tokens start unmasked and are never changed. Helpers:
:func:`make_fixed` (prompt prefix, suffix, arbitrary positions) and :func:`fixed_from_template`
("the ___ sat on the ___" with gaps of a given number of tokens).
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence, Union

import torch
from torch import Tensor, nn

from maskdiff.schedules import Schedule

__all__ = [
    "FREE",
    "FLOAT32_GUMBEL_MAX",
    "Denoiser",
    "SampleInfo",
    "time_grid",
    "vocab_alpha",
    "unmask_probability",
    "transform_logits",
    "sample_categorical",
    "gumbel_max_float32",
    "ancestral_step",
    "mean_step",
    "make_fixed",
    "fixed_from_template",
    "sample",
]

#: Marker for a free (to be generated) position in a ``fixed`` tensor.
FREE = -1

#: Largest Gumbel noise the float32 reference draw can produce: -log(-log(1 - 2^-24)) ≈ 16.64.
FLOAT32_GUMBEL_MAX = -math.log(-math.log1p(-(2.0**-24)))

Precision = Literal["float64", "float32"]
LogitsSource = Union[Tensor, Callable[[], Tensor]]


class Denoiser(Protocol):
    """``denoiser(z (B, L) long, t (B,) float) -> logits (B, L, V)``; optional ``time_conditioning``."""

    def __call__(self, z: Tensor, t: Tensor) -> Tensor: ...


# --------------------------------------------------------------------------------------------
# Time grids and schedule helpers
# --------------------------------------------------------------------------------------------


def time_grid(
    num_steps: int,
    kind: str = "cosine",
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Sampling times from 1 down to 0, shape (T + 1,), with T = ``num_steps``.

    ``"uniform"``: t_i = (T - i)/T. ``"cosine"``: the uniform times warped by
    t ← cos(π/2 · (1 - t)) (md4-math.md, "Sampling"), which keeps t_0 = 1 and t_T = 0 and takes
    small steps near t = 1, large ones near t = 0. Step i goes from t = grid[i] to s = grid[i+1].
    The endpoints are set exactly to 1 and 0 (cos(π/2) is 6e-17 in floating point).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    i = torch.arange(num_steps + 1, dtype=torch.float64, device=device)
    t = (num_steps - i) / num_steps
    key = kind.lower()
    if key == "cosine":
        t = torch.cos(0.5 * math.pi * (1.0 - t))
    elif key != "uniform":
        raise ValueError(f"unknown time grid {kind!r}; choose 'cosine' or 'uniform' (or pass a tensor of times)")
    t[0] = 1.0
    t[-1] = 0.0
    return t.to(dtype)


def _check_grid(grid: Tensor, num_steps: int) -> Tensor:
    """Validate a user-supplied grid: 1-D, T + 1 entries, strictly decreasing inside [0, 1]."""
    g = torch.as_tensor(grid, dtype=torch.float64)
    if g.dim() != 1 or g.numel() != num_steps + 1:
        raise ValueError(
            f"a time grid tensor must have shape (num_steps + 1,) = ({num_steps + 1},), got {tuple(g.shape)}"
        )
    if not torch.isfinite(g).all() or float(g.max()) > 1.0 or float(g.min()) < 0.0:
        raise ValueError("time grid values must lie in [0, 1] (1 = all masked, 0 = clean)")
    if not bool((g[1:] < g[:-1]).all()):
        raise ValueError("time grid must be strictly decreasing (sampling runs from t = 1 towards t = 0)")
    return g


def vocab_alpha(
    schedule: Schedule,
    t: Tensor,
    vocab_size: int,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """α at times ``t`` (B,) for the whole vocabulary: (B, 1) for a scalar schedule, (B, V) per-token.

    Per-token schedules are evaluated as ``schedule.alpha(t[:, None].expand(B, V),
    arange(V).expand(B, V))``; the result is cast to ``dtype``. The step functions accept
    either shape, so scalar and per-token schedules share one code path.
    """
    t = torch.as_tensor(t)
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if getattr(schedule, "per_token", False):
        sched_v = getattr(schedule, "vocab_size", vocab_size)
        if sched_v != vocab_size:
            raise ValueError(
                f"per-token schedule has vocab_size={sched_v} but sampling uses vocab_size={vocab_size}; "
                "build the schedule with the model's vocabulary size"
            )
        b = t.shape[0]
        tokens = torch.arange(vocab_size, device=t.device).expand(b, vocab_size)
        alpha = schedule.alpha(t[:, None].expand(b, vocab_size), tokens)
    else:
        alpha = schedule.alpha(t)[:, None]
    return alpha.detach().to(dtype)


def unmask_probability(alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
    """r = (α_s - α_t) / (1 - α_t), clamped to [0, 1]; r = 1 where 1 - α_t ≤ 0.

    The probability that a masked position at time t is unmasked by time s, given its clean
    token (elementwise, so it serves scalar and per-token α alike). ``1 - α_t = 0`` means a mask
    is impossible at t (e.g. GenMD4 at t = 0); such a mask is unmasked with certainty.
    """
    denom = 1.0 - alpha_t
    safe = denom > 0
    r = (alpha_s - alpha_t) / torch.where(safe, denom, torch.ones_like(denom))
    return torch.where(safe, r, torch.ones_like(r)).clamp(0.0, 1.0)


def _rowwise_alpha(alpha: Tensor | float, batch: int, vocab_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalise α to (B, 1) (scalar schedule) or (B, V) (per-token), in ``dtype``.

    Accepted: a number or 0-d tensor; (B,) or (1,) one value per sequence; (B or 1, 1);
    (B or 1, V) per token. A per-token α must be 2-D.
    """
    a = torch.as_tensor(alpha, device=device).to(dtype)
    if a.dim() == 0:
        a = a.reshape(1, 1)
    elif a.dim() == 1:
        if a.shape[0] not in (1, batch):
            raise ValueError(
                f"1-D alpha must have one value per sequence (shape ({batch},)), got {tuple(a.shape)}; "
                f"pass a per-token alpha as shape (B or 1, {vocab_size})"
            )
        a = a[:, None]
    elif a.dim() == 2:
        if a.shape[0] not in (1, batch) or a.shape[1] not in (1, vocab_size):
            raise ValueError(
                f"alpha of shape {tuple(a.shape)} does not fit batch {batch} and vocabulary {vocab_size}: "
                f"use (B or 1, 1) for a scalar schedule or (B or 1, {vocab_size}) per token"
            )
    else:
        raise ValueError(f"alpha must be 0-, 1- or 2-D, got shape {tuple(a.shape)}")
    return a.expand(batch, a.shape[1])


# --------------------------------------------------------------------------------------------
# Logit transforms and categorical draws
# --------------------------------------------------------------------------------------------


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
    truncated (see the module docstring). Provided to compare against the exact float64 draw.
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


def _check_precision(precision: str) -> None:
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' (exact) or 'float32' (reference Gumbel-max), got {precision!r}")


# --------------------------------------------------------------------------------------------
# One reverse step
# --------------------------------------------------------------------------------------------


def _resolve_logits(logits: LogitsSource, batch: int, length: int, vocab_size: int) -> Tensor:
    lg = logits() if callable(logits) else logits
    if not isinstance(lg, Tensor) or tuple(lg.shape) != (batch, length, vocab_size):
        shape = tuple(lg.shape) if isinstance(lg, Tensor) else type(lg).__name__
        hint = " (drop the mask logit: the denoiser predicts only the V real tokens)" if (
            isinstance(lg, Tensor) and lg.dim() == 3 and lg.shape[-1] == vocab_size + 1
        ) else ""
        raise ValueError(f"denoiser logits have shape {shape}, expected (B, L, V) = {(batch, length, vocab_size)}{hint}")
    return lg


def _step_setup(
    z: Tensor, logits: LogitsSource, vocab_size: int | None
) -> tuple[int, int, int]:
    if z.dim() != 2 or z.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"z must be an integer tensor of shape (B, L), got {z.dtype} {tuple(z.shape)}")
    if vocab_size is None:
        if callable(logits):
            raise ValueError("pass vocab_size when logits is a callable (it is only called when needed)")
        vocab_size = int(logits.shape[-1])
    b, l = z.shape
    return b, l, int(vocab_size)


def ancestral_step(
    z: Tensor,
    logits: LogitsSource,
    alpha_t: Tensor | float,
    alpha_s: Tensor | float,
    *,
    generator: torch.Generator | None = None,
    precision: Precision = "float64",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """One MD4/GenMD4 ancestral step z_t → z_s (s < t). Returns a new LongTensor (B, L).

    Args:
        z: (B, L) tokens at time t, mask id V at masked positions.
        logits: denoiser output (B, L, V) at (z, t), or a zero-argument callable returning it;
            a callable is only invoked when the step needs μ (lazy evaluation).
        alpha_t, alpha_s: α at t and s: (B, 1) / (B,) / scalar for a scalar schedule, or
            (B or 1, V) per token (see :func:`vocab_alpha`).
        precision: ``"float64"`` exact two-stage draw; ``"float32"`` the reference one-shot
            float32 Gumbel-max draw over the V + 1 outcomes.
        temperature, top_k, top_p: applied to the logits before μ = softmax (see
            :func:`transform_logits`).
        vocab_size: V; required only when ``logits`` is a callable.

    Each masked position becomes token j with probability μ_j r_j, r_j = (α_{s,j} - α_{t,j}) /
    (1 - α_{t,j}), and stays masked otherwise; unmasked positions are copied.

    Random numbers (float64): two uniforms per masked position, drawn before μ is needed, so
    the stream consumed does not depend on whether or when the denoiser is evaluated.
    """
    _check_precision(precision)
    _check_transform_args(temperature, top_k, top_p)
    b, l, v = _step_setup(z, logits, vocab_size)
    dtype = torch.float64 if precision == "float64" else torch.float32
    a_t = _rowwise_alpha(alpha_t, b, v, dtype, z.device)
    a_s = _rowwise_alpha(alpha_s, b, v, dtype, z.device)
    if bool((a_s < a_t - 1e-6).any()):
        raise ValueError("alpha_s < alpha_t: the step must go backwards in time (s < t, so α_s ≥ α_t)")
    rate = unmask_probability(a_t, a_s)  # (B, 1) or (B, V)
    out = z.clone()
    masked = z == v
    if not bool(masked.any()):
        return out
    bi, li = masked.nonzero(as_tuple=True)
    n = bi.numel()

    if precision == "float32":
        # Reference: probs = [μ r, 1 - Σ μ r] in float32, Categorical(probs) by Gumbel-max.
        lg = _resolve_logits(logits, b, l, v)
        x = transform_logits(lg[bi, li].to(torch.float32), temperature=temperature, top_k=top_k, top_p=top_p)
        mu = _softmax(x)
        r = rate[bi]
        p_vocab = mu * r
        p_mask = (1.0 - r) if r.shape[-1] == 1 else (1.0 - p_vocab.sum(-1, keepdim=True))
        probs = torch.cat([p_vocab, p_mask.clamp_min(0.0)], dim=-1)
        out[bi, li] = gumbel_max_float32(torch.log(probs), generator)
        return out

    u_unmask = torch.rand(n, generator=generator, device=z.device, dtype=torch.float64)
    u_token = torch.rand(n, generator=generator, device=z.device, dtype=torch.float64)
    # P_u = Σ_j μ_j r_j ≤ max_j r_j: positions with u ≥ max_j r_j stay masked whatever μ is.
    cand = u_unmask < rate.amax(-1)[bi]
    if not bool(cand.any()):
        return out
    lg = _resolve_logits(logits, b, l, v)
    ci = cand.nonzero(as_tuple=True)[0]
    if rate.shape[-1] == 1:
        # Scalar schedule: P_u = r exactly, and the token given unmasking is distributed as μ.
        rows = ci
        weights = _mu64(lg[bi[rows], li[rows]], temperature, top_k, top_p)
    else:
        # Only the candidates need μ: (Nc, V) with Nc ≈ N · max_j r_j.
        x = _mu64(lg[bi[ci], li[ci]], temperature, top_k, top_p) * rate[bi[ci]]  # μ_j r_j
        p_u = x.sum(-1).clamp(0.0, 1.0)
        keep = u_unmask[ci] < p_u
        rows = ci[keep]
        weights = x[keep]
    if rows.numel():
        tok = _inverse_cdf(weights, u_token[rows, None])[:, 0]
        out[bi[rows], li[rows]] = tok
    return out


def _mu64(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """μ = softmax(transform(logits)) in float64, rows (N, V)."""
    x = transform_logits(logits.to(torch.float64), temperature=temperature, top_k=top_k, top_p=top_p)
    return _softmax(x)


def mean_step(
    z: Tensor,
    logits: LogitsSource,
    alpha_t: Tensor | float,
    alpha_s: Tensor | float,
    *,
    generator: torch.Generator | None = None,
    precision: Precision = "float64",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """The "mean" variant: draw x̂ ~ μ at every masked position, then unmask with probability r.

    r = (α_s - α_t)/(1 - α_t); scalar schedules only. Arguments as :func:`ancestral_step`.
    For a scalar schedule this is the same law as the ancestral step (per position: unmask
    with probability r, token ~ μ); it differs in the random stream and, with
    ``precision="float32"``, in that the reference's Gumbel draw runs over the V tokens only.
    Random numbers: x̂ for all masked positions first, then one uniform per masked position.
    """
    _check_precision(precision)
    _check_transform_args(temperature, top_k, top_p)
    b, l, v = _step_setup(z, logits, vocab_size)
    dtype = torch.float64 if precision == "float64" else torch.float32
    a_t = _rowwise_alpha(alpha_t, b, v, dtype, z.device)
    a_s = _rowwise_alpha(alpha_s, b, v, dtype, z.device)
    if a_t.shape[-1] != 1 or a_s.shape[-1] != 1:
        raise ValueError(
            "the 'mean' sampler needs a scalar schedule: with a per-token schedule (GenMD4) the "
            "unmasking probability depends on the token; use sampler='ancestral'"
        )
    if bool((a_s < a_t - 1e-6).any()):
        raise ValueError("alpha_s < alpha_t: the step must go backwards in time (s < t, so α_s ≥ α_t)")
    rate = unmask_probability(a_t, a_s)[:, 0]  # (B,)
    out = z.clone()
    masked = z == v
    if not bool(masked.any()):
        return out
    bi, li = masked.nonzero(as_tuple=True)
    n = bi.numel()
    lg = _resolve_logits(logits, b, l, v)
    if precision == "float32":
        x = transform_logits(lg[bi, li].to(torch.float32), temperature=temperature, top_k=top_k, top_p=top_p)
        x_hat = gumbel_max_float32(x, generator)
        u = torch.rand(n, generator=generator, device=z.device, dtype=torch.float32)
    else:
        mu = _mu64(lg[bi, li], temperature, top_k, top_p)
        x_hat = _inverse_cdf(mu, torch.rand(n, 1, generator=generator, device=z.device, dtype=torch.float64))[:, 0]
        u = torch.rand(n, generator=generator, device=z.device, dtype=torch.float64)
    unmask = u < rate[bi]
    out[bi[unmask], li[unmask]] = x_hat[unmask]
    return out


# --------------------------------------------------------------------------------------------
# Conditioning helpers
# --------------------------------------------------------------------------------------------


def _as_token_rows(tokens: Sequence[int] | Tensor, name: str) -> Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"{name} must be a sequence of token ids (P,) or a batch (B, P), got shape {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} token ids must be ≥ 0")
    return t


def make_fixed(
    length: int,
    *,
    prefix: Sequence[int] | Tensor | None = None,
    suffix: Sequence[int] | Tensor | None = None,
    positions: Mapping[int, int] | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Build a ``fixed`` tensor (B or 1, L): token ids where fixed, ``FREE`` (-1) elsewhere.

    Args:
        length: L.
        prefix: prompt tokens placed at positions 0..P-1; (P,) shared or (B, P) per sequence.
        suffix: tokens placed at the end, L-S..L-1; (S,) or (B, S).
        positions: {position: token} for arbitrary fixed positions (negative positions count
            from the end), shared by the batch.
        batch_size: broadcast the result to (B, L); otherwise its batch dimension is 1 unless a
            (B, P) prefix/suffix sets it.
    """
    if length < 1:
        raise ValueError(f"length must be ≥ 1, got {length}")
    rows = [1]
    pre = _as_token_rows(prefix, "prefix") if prefix is not None else None
    suf = _as_token_rows(suffix, "suffix") if suffix is not None else None
    for t in (pre, suf):
        if t is not None:
            rows.append(t.shape[0])
    if batch_size is not None:
        rows.append(batch_size)
    b = max(rows)
    if any(r not in (1, b) for r in rows):
        raise ValueError(f"prefix, suffix and batch_size disagree on the batch size: {rows[1:]}")
    fixed = torch.full((b, length), FREE, dtype=torch.long)
    taken = torch.zeros(length, dtype=torch.bool)
    if pre is not None and pre.shape[1]:
        p = pre.shape[1]
        if p > length:
            raise ValueError(f"prefix has {p} tokens but the sequence length is {length}")
        fixed[:, :p] = pre
        taken[:p] = True
    if suf is not None and suf.shape[1]:
        s = suf.shape[1]
        if s > length:
            raise ValueError(f"suffix has {s} tokens but the sequence length is {length}")
        if bool(taken[length - s :].any()):
            raise ValueError(f"prefix and suffix overlap: together they need more than {length} positions")
        fixed[:, length - s :] = suf
        taken[length - s :] = True
    for pos, tok in (positions or {}).items():
        i = pos + length if pos < 0 else pos
        if not 0 <= i < length:
            raise ValueError(f"fixed position {pos} is outside a sequence of length {length}")
        if tok < 0:
            raise ValueError(f"fixed token at position {pos} must be ≥ 0, got {tok}")
        if bool(taken[i]):
            raise ValueError(f"position {pos} is fixed twice (prefix/suffix/positions overlap)")
        fixed[:, i] = int(tok)
        taken[i] = True
    return fixed


def fixed_from_template(
    template: str,
    tokenizer: Any,
    *,
    gap: str = "___",
    gap_length: int | Sequence[int] = 8,
    length: int | None = None,
) -> Tensor:
    """Infilling template → ``fixed`` (1, L), e.g. ``"the ___ sat on the ___"``.

    The text between gaps is encoded piece by piece with ``tokenizer.encode(str) -> list[int]``
    (so sub-word tokenizers see each piece on its own; keep spaces next to the words they
    belong to); every ``gap`` becomes ``gap_length`` free positions (an int for all gaps, or
    one per gap). With ``length`` larger than the template, the remaining positions at the end
    are free; smaller is an error.
    """
    if not gap:
        raise ValueError("gap marker must be a non-empty string")
    if not hasattr(tokenizer, "encode"):
        raise TypeError("tokenizer must have an encode(str) -> list[int] method")
    pieces = template.split(gap)
    n_gaps = len(pieces) - 1
    if isinstance(gap_length, int):
        lengths = [gap_length] * n_gaps
    else:
        lengths = [int(g) for g in gap_length]
        if len(lengths) != n_gaps:
            raise ValueError(f"template has {n_gaps} gaps but {len(lengths)} gap lengths were given")
    if any(g < 0 for g in lengths):
        raise ValueError(f"gap lengths must be ≥ 0, got {lengths}")
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if piece:
            enc = [int(i) for i in tokenizer.encode(piece)]
            if any(i < 0 for i in enc):
                raise ValueError("tokenizer returned negative token ids")
            ids.extend(enc)
        if k < n_gaps:
            ids.extend([FREE] * lengths[k])
    total = len(ids)
    if length is not None:
        if length < total:
            raise ValueError(f"template needs {total} tokens but length={length}; shorten the gaps or the text")
        ids.extend([FREE] * (length - total))
    if not ids:
        raise ValueError("template produced an empty sequence")
    return torch.tensor(ids, dtype=torch.long)[None]


def _prepare_fixed(fixed: Tensor | None, batch: int, length: int, vocab_size: int, device: torch.device) -> Tensor | None:
    """Validate ``fixed`` and return it as (B, L) with ``FREE`` at free positions (or None)."""
    if fixed is None:
        return None
    f = torch.as_tensor(fixed).to(device=device)
    if f.dtype.is_floating_point or f.dtype == torch.bool:
        raise ValueError(f"fixed must be an integer tensor of token ids, got {f.dtype}")
    f = f.long()
    if f.dim() == 1:
        f = f[None]
    if f.dim() != 2 or f.shape[1] != length or f.shape[0] not in (1, batch):
        raise ValueError(f"fixed must have shape (B or 1, L) = ({batch} or 1, {length}), got {tuple(f.shape)}")
    bad = (f < FREE) | (f > vocab_size)
    if bool(bad.any()):
        raise ValueError(
            f"fixed holds values outside [-1, {vocab_size}]: use token ids in [0, {vocab_size}) for fixed "
            f"positions and {FREE} (or the mask id {vocab_size}) for free ones"
        )
    f = torch.where(f == vocab_size, torch.full_like(f, FREE), f)
    return f.expand(batch, length)


# --------------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------------


@dataclass
class SampleInfo:
    """What :func:`sample` did. Shapes use B = batch size, T = number of steps."""

    num_steps: int
    #: network invocations, including the final fill call if one was needed.
    denoiser_calls: int = 0
    #: sequences evaluated in total (Σ over calls of the batch size of each call).
    denoiser_rows: int = 0
    #: steps whose denoiser output came from the cache (time-agnostic denoisers only).
    cache_hits: int = 0
    #: steps that needed no denoiser output at all (lazy evaluation: nothing could unmask).
    lazy_skips: int = 0
    #: masks left after the last step and filled with the argmax of one more denoiser call.
    leftover_masks: int = 0
    #: the time grid used, (T + 1,).
    times: Tensor = field(default_factory=lambda: torch.empty(0))
    #: masks per sequence before the first step and after each step, (T + 1, B) (fixed
    #: positions never count).
    num_masked: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    #: states z (mask id V at masked positions) after the steps in ``trajectory_steps``,
    #: (K, B, L), for a visualisation strip; None unless ``record_every`` was given.
    trajectory: Tensor | None = None
    trajectory_steps: list[int] = field(default_factory=list)
    batch_size: int = 0

    @property
    def nfe_per_sample(self) -> float:
        """Denoiser evaluations per generated sequence."""
        return self.denoiser_rows / max(self.batch_size, 1)


def _owner(denoiser: Any) -> Any:
    """The denoiser itself, or the object a bound method belongs to (e.g. ``model.denoiser``)."""
    return denoiser if isinstance(denoiser, nn.Module) else getattr(denoiser, "__self__", None)


def _module_device(obj: Any) -> torch.device | None:
    if isinstance(obj, nn.Module):
        for p in obj.parameters():
            return p.device
        for buf in obj.buffers():
            return buf.device
    return None


def _prepare_schedule(schedule: Schedule, dtype: torch.dtype, device: torch.device) -> Schedule:
    """A copy of an ``nn.Module`` schedule in ``dtype`` on ``device`` (the original is untouched)."""
    if not isinstance(schedule, nn.Module):
        return schedule
    tensors = list(schedule.parameters()) + list(schedule.buffers())
    if all((not t.is_floating_point() or t.dtype == dtype) and t.device == device for t in tensors):
        return schedule
    return copy.deepcopy(schedule).to(device=device, dtype=dtype)


def _is_time_agnostic(denoiser: Any, time_agnostic: bool | None) -> bool:
    declared = getattr(denoiser, "time_conditioning", getattr(_owner(denoiser), "time_conditioning", None))
    if time_agnostic is None:
        # Rule: a denoiser that does not say otherwise is assumed to use t.
        return declared is False
    if time_agnostic and declared is True:
        raise ValueError(
            "time_agnostic=True contradicts denoiser.time_conditioning=True; a time-conditioned "
            "network's output depends on t, so its outputs cannot be reused across steps"
        )
    return bool(time_agnostic)


def sample(
    denoiser: Denoiser,
    schedule: Schedule,
    *,
    batch_size: int,
    length: int,
    vocab_size: int,
    num_steps: int,
    grid: str | Tensor = "cosine",
    generator: torch.Generator | None = None,
    sampler: Literal["ancestral", "mean"] = "ancestral",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    precision: Precision = "float64",
    cache: bool | Literal["auto"] = False,
    cache_scope: Literal["batch", "row"] = "batch",
    lazy: bool = True,
    time_agnostic: bool | None = None,
    fixed: Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    return_info: bool = False,
    record_every: int | None = None,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """Generate ``batch_size`` sequences of ``length`` tokens with the MD4/GenMD4 reverse process.

    Starts from all masks (except ``fixed`` positions) at t = 1 and applies ``num_steps`` steps
    along the time grid (``"cosine"``, ``"uniform"``, or a strictly decreasing tensor of T + 1
    times); masks left after the last step are filled with the argmax of one more denoiser call
    at the last grid time (0 for the built-in grids).

    Args:
        denoiser: ``denoiser(z (B, L) long, t (B,) float32) -> logits (B, L, V)``. If it (or,
            for a bound method such as ``model.denoiser``, its owner) has
            ``time_conditioning = False`` it is treated as time-agnostic; a missing attribute
            means time-conditioned unless ``time_agnostic=True`` is passed.
        schedule: a scalar schedule or a per-token one (GenMD4, needs ``vocab_size`` equal).
        sampler: ``"ancestral"`` (:func:`ancestral_step`) or ``"mean"`` (:func:`mean_step`,
            scalar schedules only).
        temperature, top_k, top_p: applied to the logits before each step.
        precision: ``"float64"`` exact draws; ``"float32"`` the reference float32 Gumbel-max.
        cache: reuse the previous denoiser output when no token changed since it was computed:
            True (raises ValueError for a time-conditioned denoiser), False, or ``"auto"``
            (cache exactly when the denoiser is time-agnostic).
        cache_scope: ``"batch"`` calls the network on the whole batch whenever any sequence
            changed; ``"row"`` re-evaluates only the sequences that changed.
        lazy: skip the denoiser when the float64 ancestral step can tell without μ that no
            position unmasks (exact for any denoiser).
        fixed: (B or 1, L) token ids at fixed positions, ``FREE`` (-1) or the mask id elsewhere.
        device: where to sample; default the denoiser's parameter device, else CPU. The
            generator must live on the same device type.
        progress: show a tqdm progress bar.
        return_info: also return a :class:`SampleInfo` (call counts, masks per step, grid).
        record_every: with ``return_info``, record z every this many steps (and the last).

    Returns:
        LongTensor (batch_size, length) with tokens in [0, vocab_size), or (tokens, info).
    """
    # ---- validate arguments -------------------------------------------------------------
    for name, val in (("batch_size", batch_size), ("length", length), ("vocab_size", vocab_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if sampler not in ("ancestral", "mean"):
        raise ValueError(f"sampler must be 'ancestral' or 'mean', got {sampler!r}")
    _check_precision(precision)
    _check_transform_args(temperature, top_k, top_p)
    if isinstance(cache, str):
        if cache != "auto":
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
    elif isinstance(cache, (bool, int)):
        cache = bool(cache)
    else:
        raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
    if cache_scope not in ("batch", "row"):
        raise ValueError(f"cache_scope must be 'batch' or 'row', got {cache_scope!r}")
    if record_every is not None:
        if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 1:
            raise ValueError(f"record_every must be None or an int ≥ 1, got {record_every!r}")
        if not return_info:
            raise ValueError("record_every records into the SampleInfo: pass return_info=True as well")
    per_token = bool(getattr(schedule, "per_token", False))
    if sampler == "mean" and per_token:
        raise ValueError(
            "the 'mean' sampler needs a scalar schedule: with a per-token schedule (GenMD4) the "
            "unmasking probability depends on the token; use sampler='ancestral'"
        )
    agnostic = _is_time_agnostic(denoiser, time_agnostic)
    if cache is True and not agnostic:
        raise ValueError(
            "cache=True needs a time-agnostic denoiser (its output must depend on z only), but this "
            "denoiser is time-conditioned (time_conditioning is True or not set). Use cache=False, "
            "cache='auto', or pass time_agnostic=True if the network really ignores t"
        )
    use_cache = agnostic if cache == "auto" else bool(cache)

    if device is None:
        dev = _module_device(_owner(denoiser)) or torch.device("cpu")
    else:
        dev = torch.device(device)
    if generator is not None and generator.device.type != dev.type:
        raise ValueError(
            f"generator is on {generator.device} but sampling runs on {dev}: create it with "
            f"torch.Generator(device={str(dev)!r})"
        )
    owner = _owner(denoiser)
    if isinstance(owner, nn.Module) and owner.training:
        warnings.warn(
            "the denoiser is in training mode (dropout etc. active); call denoiser.eval() before sampling",
            stacklevel=2,
        )

    times = time_grid(num_steps, grid) if isinstance(grid, str) else _check_grid(grid, num_steps)
    times = times.to(dev)
    dtype = torch.float64 if precision == "float64" else torch.float32
    sched = _prepare_schedule(schedule, torch.float64, dev)
    b, l, v = batch_size, length, vocab_size
    fix = _prepare_fixed(fixed, b, l, v, dev)

    info = SampleInfo(num_steps=num_steps, times=times.detach().cpu(), batch_size=b)
    z = torch.full((b, l), v, dtype=torch.long, device=dev)
    if fix is not None:
        z = torch.where(fix >= 0, fix, z)

    # ---- denoiser evaluation with optional caching --------------------------------------
    cached: Tensor | None = None
    dirty = torch.ones(b, dtype=torch.bool, device=dev)  # rows changed since the cached output

    def evaluate(rows: Tensor | None, t_value: Tensor) -> Tensor:
        zz = z if rows is None else z[rows]
        tt = t_value.to(torch.float32).expand(zz.shape[0]).contiguous()
        lg = denoiser(zz, tt)
        info.denoiser_calls += 1
        info.denoiser_rows += zz.shape[0]
        if not isinstance(lg, Tensor) or tuple(lg.shape) != (zz.shape[0], l, v):
            _resolve_logits(lg, zz.shape[0], l, v)  # raises with a clear message
        if not bool(torch.isfinite(lg).all()) and (  # one pass when all finite; -inf is allowed
            bool(torch.isnan(lg).any()) or bool(torch.isposinf(lg).any()) or bool((lg.amax(-1) == -math.inf).any())
        ):
            raise ValueError("denoiser returned NaN/+inf logits or a row with every logit -inf")
        return lg

    def get_logits(t_value: Tensor) -> Tensor:
        nonlocal cached
        if not use_cache:
            return evaluate(None, t_value)
        if cached is not None and not bool(dirty.any()):
            info.cache_hits += 1
            return cached
        if cached is None or cache_scope == "batch" or bool(dirty.all()):
            cached = evaluate(None, t_value)
        else:
            rows = dirty.nonzero(as_tuple=True)[0]
            cached = cached.clone()
            cached[rows] = evaluate(rows, t_value).to(cached.dtype)
        dirty.zero_()
        return cached

    # ---- the reverse process ------------------------------------------------------------
    step_fn = ancestral_step if sampler == "ancestral" else mean_step
    counts = [(z == v).sum(1)]
    record = record_every is not None
    traj: list[Tensor] = [z.clone()] if record else []
    traj_steps: list[int] = [0] if record else []

    iterator: Any = range(num_steps)
    if progress:
        from tqdm.auto import tqdm  # imported on use: no import-time cost

        iterator = tqdm(iterator, desc="sampling", unit="step")
    with torch.no_grad():
        # α at every grid time, evaluated once: (T + 1, 1) or (T + 1, V), float64.
        alphas = vocab_alpha(sched, times, v, dtype=torch.float64)
        for i in iterator:
            t_i = times[i]
            calls_before = info.denoiser_calls + info.cache_hits
            source: LogitsSource = (lambda t_=t_i: get_logits(t_))
            if not (lazy and sampler == "ancestral" and precision == "float64"):
                source = source()
            z_new = step_fn(
                z,
                source,
                alphas[i : i + 1].to(dtype),
                alphas[i + 1 : i + 2].to(dtype),
                generator=generator,
                precision=precision,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                vocab_size=v,
            )
            if info.denoiser_calls + info.cache_hits == calls_before:
                info.lazy_skips += 1
            dirty |= (z_new != z).any(1)
            z = z_new
            counts.append((z == v).sum(1))
            if record and ((i + 1) % record_every == 0 or i + 1 == num_steps):
                traj.append(z.clone())
                traj_steps.append(i + 1)

        leftover = z == v
        info.leftover_masks = int(leftover.sum())
        if info.leftover_masks:
            lg = get_logits(times[-1])
            z = torch.where(leftover, lg.argmax(-1), z)

    info.num_masked = torch.stack(counts).cpu()
    if record:
        info.trajectory = torch.stack(traj).cpu()
        info.trajectory_steps = traj_steps
    if fix is not None and not bool(((fix < 0) | (z == fix)).all()):  # pragma: no cover - invariant
        raise RuntimeError("internal error: a fixed token changed during sampling")
    return (z, info) if return_info else z
