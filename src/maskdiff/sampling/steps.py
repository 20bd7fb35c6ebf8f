"""Time grids, α over the vocabulary, and the reverse step z_t → z_s (ancestral and "mean").

The step's law is in the package docstring (:mod:`maskdiff.sampling`, "The ancestral step") and
docs/math.md, "The ancestral step", "Time grids" and "The mean variant". A step takes the
denoiser's logits either as a tensor or as a zero-argument callable (:data:`LogitsSource`),
which the float64 ancestral step calls only when some position may unmask.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import Tensor

from maskdiff.sampling.categorical import (
    Precision,
    _check_logit_rows,
    _check_precision,
    _check_transform_args,
    _inverse_cdf,
    _mu64,
    _row_chunks,
    _softmax,
    gumbel_max_float32,
    transform_logits,
)
from maskdiff.schedules import Schedule

__all__ = [
    "LogitsSource",
    "time_grid",
    "vocab_alpha",
    "unmask_probability",
    "ancestral_step",
    "mean_step",
]

#: Denoiser logits (B, L, V), or a zero-argument callable returning them when first needed.
LogitsSource = Union[Tensor, Callable[[], Tensor]]


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
    t ← cos(π/2 · (1 - t)) (docs/math.md, "Time grids"), which keeps t_0 = 1 and t_T = 0 and takes
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


def _step_rate(alpha_t: Tensor | float, alpha_s: Tensor | float, batch: int, vocab_size: int, device: torch.device) -> Tensor:
    """r = (α_s - α_t) / (1 - α_t), formed in float64 whatever the draw's precision: (B, 1) or (B, V).

    In float32, α close to 1 (or to ε) loses the digits that the difference α_s - α_t needs
    (several percent of r at the last steps of a 1,000-step grid; docs/math.md, "Numerics").
    """
    a_t = _rowwise_alpha(alpha_t, batch, vocab_size, torch.float64, device)
    a_s = _rowwise_alpha(alpha_s, batch, vocab_size, torch.float64, device)
    if bool((a_s < a_t - 1e-6).any()):
        raise ValueError("alpha_s < alpha_t: the step must go backwards in time (s < t, so α_s ≥ α_t)")
    return unmask_probability(a_t, a_s)


def _float32_ancestral_draw(logits: Tensor, rate: Tensor, generator: torch.Generator | None, transform: dict) -> Tensor:
    """The reference draw for rows (c, V) of logits with float64 rates (c, 1) or (c, V): probs =
    [μ r, 1 - Σ μ r] in float32, Categorical(probs) by float32 Gumbel-max; returns (c,) in [0, V]."""
    _check_logit_rows(logits)
    mu = _softmax(transform_logits(logits.to(torch.float32), **transform))
    p_vocab = mu * rate.to(torch.float32)
    p_mask = (1.0 - rate).to(torch.float32) if rate.shape[-1] == 1 else (1.0 - p_vocab.sum(-1, keepdim=True))
    probs = torch.cat([p_vocab, p_mask.clamp_min(0.0)], dim=-1)
    return gumbel_max_float32(torch.log(probs), generator)


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
            (B or 1, V) per token (see :func:`vocab_alpha`). Pass them in float64: the step
            forms r from them in float64 for either precision.
        precision: ``"float64"`` exact two-stage draw; ``"float32"`` the reference one-shot
            float32 Gumbel-max draw over the V + 1 outcomes.
        temperature, top_k, top_p: applied to the logits before μ = softmax (see
            :func:`transform_logits`).
        vocab_size: V; required only when ``logits`` is a callable.

    Each masked position becomes token j with probability μ_j r_j, r_j = (α_{s,j} - α_{t,j}) /
    (1 - α_{t,j}), and stays masked otherwise; unmasked positions are copied. Raises ValueError
    if the logits of a masked position that the step uses are NaN, +inf, or -inf for every token.
    The masked positions are processed in chunks of :data:`DRAW_CHUNK_ELEMENTS` // V rows.

    Random numbers (float64): two uniforms per masked position, drawn before μ is needed, so
    the stream consumed does not depend on whether or when the denoiser is evaluated.
    """
    _check_precision(precision)
    _check_transform_args(temperature, top_k, top_p)
    b, l, v = _step_setup(z, logits, vocab_size)
    rate = _step_rate(alpha_t, alpha_s, b, v, z.device)  # (B, 1) or (B, V), float64
    transform = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    out = z.clone()
    masked = z == v
    if not bool(masked.any()):
        return out
    bi, li = masked.nonzero(as_tuple=True)
    n = bi.numel()

    if precision == "float32":
        lg = _resolve_logits(logits, b, l, v)
        for part in _row_chunks(n, v + 1):
            out[bi[part], li[part]] = _float32_ancestral_draw(lg[bi[part], li[part]], rate[bi[part]], generator, transform)
        return out

    u_unmask = torch.rand(n, generator=generator, device=z.device, dtype=torch.float64)
    u_token = torch.rand(n, generator=generator, device=z.device, dtype=torch.float64)
    # P_u = Σ_j μ_j r_j ≤ max_j r_j: positions with u ≥ max_j r_j stay masked whatever μ is.
    cand = u_unmask < rate.amax(-1)[bi]
    if not bool(cand.any()):
        return out
    lg = _resolve_logits(logits, b, l, v)
    candidates = cand.nonzero(as_tuple=True)[0]
    for part in _row_chunks(candidates.numel(), v):
        ci = candidates[part]
        rows, tokens = _float64_ancestral_draw(lg[bi[ci], li[ci]], rate, bi[ci], ci, u_unmask, u_token, transform)
        out[bi[rows], li[rows]] = tokens
    return out


def _float64_ancestral_draw(
    logits: Tensor, rate: Tensor, batch_rows: Tensor, ci: Tensor, u_unmask: Tensor, u_token: Tensor, transform: dict
) -> tuple[Tensor, Tensor]:
    """The exact draw for the candidates ``ci`` (c,), with logits (c, V), in batch rows
    ``batch_rows`` (c,) of the float64 rates (B, 1) or (B, V): the indices (into the masked
    positions) that unmask, and their tokens."""
    _check_logit_rows(logits)
    if rate.shape[-1] == 1:
        # Scalar schedule: P_u = r exactly, and the token given unmasking is distributed as μ.
        rows = ci
        weights = _mu64(logits, **transform)
    else:
        # Only the candidates need μ: (Nc, V) with Nc ≈ N · max_j r_j.
        x = _mu64(logits, **transform) * rate[batch_rows]  # μ_j r_j
        keep = u_unmask[ci] < x.sum(-1).clamp(0.0, 1.0)  # unmask with P_u = Σ_j μ_j r_j
        rows = ci[keep]
        weights = x[keep]
    if not rows.numel():
        return rows, rows
    return rows, _inverse_cdf(weights, u_token[rows, None])[:, 0]


def _mean_token_draw(logits: Tensor, u: Tensor | None, generator: torch.Generator | None, transform: dict) -> Tensor:
    """x̂ ~ μ for rows (c, V) of logits: by inverse CDF with the float64 uniforms u (c, 1), or, with
    u None, by the reference float32 Gumbel-max over the V tokens."""
    _check_logit_rows(logits)
    if u is None:
        return gumbel_max_float32(transform_logits(logits.to(torch.float32), **transform), generator)
    return _inverse_cdf(_mu64(logits, **transform), u)[:, 0]


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

    r = (α_s - α_t)/(1 - α_t) (formed in float64); scalar schedules only. Arguments and errors
    as :func:`ancestral_step`. For a scalar schedule this is the same law as the ancestral step
    (per position: unmask with probability r, token ~ μ); it differs in the random stream and,
    with ``precision="float32"``, in that the reference's Gumbel draw runs over the V tokens only.
    Random numbers: x̂ for all masked positions first, then one uniform per masked position.
    """
    _check_precision(precision)
    _check_transform_args(temperature, top_k, top_p)
    b, l, v = _step_setup(z, logits, vocab_size)
    alphas = [_rowwise_alpha(a, b, v, torch.float64, z.device) for a in (alpha_t, alpha_s)]
    if alphas[0].shape[-1] != 1 or alphas[1].shape[-1] != 1:
        raise ValueError(
            "the 'mean' sampler needs a scalar schedule: with a per-token schedule (GenMD4) the "
            "unmasking probability depends on the token; use sampler='ancestral'"
        )
    rate = _step_rate(alphas[0], alphas[1], b, v, z.device)[:, 0]  # (B,), float64
    transform = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    out = z.clone()
    masked = z == v
    if not bool(masked.any()):
        return out
    bi, li = masked.nonzero(as_tuple=True)
    n = bi.numel()
    lg = _resolve_logits(logits, b, l, v)
    x_hat = torch.empty(n, dtype=torch.long, device=z.device)
    u_hat = torch.rand(n, 1, generator=generator, device=z.device, dtype=torch.float64) if precision == "float64" else None
    for part in _row_chunks(n, v):
        x_hat[part] = _mean_token_draw(lg[bi[part], li[part]], u_hat[part] if precision == "float64" else None,
                                       generator, transform)
    u = torch.rand(n, generator=generator, device=z.device, dtype=torch.float64 if precision == "float64" else torch.float32)
    unmask = u < rate[bi]
    out[bi[unmask], li[unmask]] = x_hat[unmask]
    return out
