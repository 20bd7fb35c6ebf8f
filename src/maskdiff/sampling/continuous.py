"""Exact samplers of the continuous-time reverse process: ``first-hitting`` and ``genmd4-exact``.

No time grid, no discretisation error: both simulate the continuous-time model (docs/math.md,
"Exact continuous-time sampling"). Each network call unmasks at most one token per sequence.

The reverse process
-------------------
In the model, a masked position at time t unmasks into token j at the rate (going down in time)

    λ_j(t) = μ_j(z_t, t) · h_j(t),      h_j(t) = -α'_{t,j} / (1 - α_{t,j}),

and positions move one at a time. For a scalar schedule h_j = h does not depend on j, so the
total rate n·h(t) of the n masked positions does not depend on μ: the time of the next unmasking
has a closed law, the position is uniform and its token is drawn from μ (``first-hitting``).
For a per-token schedule (GenMD4) the rate depends on μ, and ``genmd4-exact`` uses thinning:
propose times from a Poisson process whose rate n·h̄(t) bounds the total rate (h̄ ≥ max_j h_j),
accept a proposal at s with probability R(s) / (n h̄(s)), R(s) = Σ_l Σ_j μ_lj(z, s) h_j(s), and
on acceptance pick (l, j) ∝ μ_lj h_j(s).

Both share :func:`_event_loop`; what differs is the *envelope*, which proposes times and gives
the relative hazards h_j(s) / h̄(s) ∈ [0, 1]:

* :class:`_ScalarEnvelope` — h̄ = h: the next time solves (1 - α_s) = (1 - α_t) u^{1/n} (every
  proposal is accepted: the ratio is exactly 1);
* :class:`_GenMD4Envelope` — h_j = w_j / t, h̄ = w_max / t: s = t · u^{1/(n w_max)}, ratio
  Σ_l Σ_j μ_lj w_j / (n w_max);
* :class:`_IntervalEnvelope` — a constant bound b ≥ max_j h_j on [t_lo, t] (t_lo = t/2, from
  ``schedule.hazard_bound(t_lo, t)``, or w_max / t_lo for GenMD4), refreshed per interval:
  s = t - E / (n b), E ~ Exp(1); a proposal below t_lo moves to t_lo with no event; a proposal
  with u ≥ max_j h_j(s) / b is rejected without a network call.

Random numbers: two float64 uniforms per sequence per proposal (time, acceptance) and two per
network call (position, token), drawn for the whole batch, so a sequence's stream does not
depend on whether the denoiser was called for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from maskdiff.sampling.base import Sampler
from maskdiff.sampling.categorical import _inverse_cdf, _row_chunks, gumbel_max_float32
from maskdiff.sampling.context import SamplingContext
from maskdiff.schedules import (
    CosineSchedule,
    GenMD4Schedule,
    GeometricSchedule,
    LinearSchedule,
    PolynomialSchedule,
    Schedule,
)

__all__ = ["FirstHitting", "GenMD4Exact", "time_at_mask_probability"]

#: Bisection steps of :func:`time_at_mask_probability` for schedules without a closed-form inverse
#: (each halves the interval: 64 reach float64 resolution on [0, 1]).
BISECTION_STEPS = 64


# --------------------------------------------------------------------------------------------
# α⁻¹
# --------------------------------------------------------------------------------------------


def _closed_form_time(schedule: Schedule, m: Tensor) -> Tensor | None:
    """t with 1 - α(t) = m for the built-in scalar schedules, through the unclipped α̃:
    1 - α̃(t) = (m - ε) / (1 - 2ε) = c; None for other schedules."""
    kind = type(schedule)
    if kind not in (LinearSchedule, PolynomialSchedule, CosineSchedule, GeometricSchedule):
        return None
    eps = schedule.eps
    c = (m - eps) / (1.0 - 2.0 * eps)
    if kind is LinearSchedule:  # 1 - α̃ = t
        return c
    if kind is PolynomialSchedule:  # 1 - α̃ = t^k
        return c.clamp(0.0, 1.0) ** (1.0 / schedule.exponent)
    if kind is CosineSchedule:  # 1 - α̃ = cos(π/2 (1 - t)) = sin(π t / 2)
        return torch.asin(c.clamp(0.0, 1.0)) * (2.0 / math.pi)
    # Geometric: α̃ = exp(-β_min^(1-t) β_max^t), so log(-log α̃) = log β_min + t log(β_max/β_min).
    neg_log = -torch.log1p(-c.clamp(max=1.0))
    return (torch.log(neg_log) - math.log(schedule.beta_min)) / math.log(schedule.beta_max / schedule.beta_min)


def time_at_mask_probability(schedule: Schedule, m: Tensor) -> Tensor:
    """The time t ∈ [0, 1] at which a scalar schedule's mask probability 1 - α(t) equals m (float64).

    α⁻¹ in three ways, the first that applies: the schedule's own ``alpha_inverse(alpha)`` if it
    has one (given 1 - m); a closed form for the built-in schedules (linear, polynomial, cosine,
    geometric; through the unclipped α̃); otherwise :data:`BISECTION_STEPS` steps of bisection
    on [0, 1], which needs only that 1 - α(t) increases with t. Values of m outside
    [1 - α(0), 1 - α(1)] give t = 0 or t = 1.
    """
    m = m.to(torch.float64)
    inverse = getattr(schedule, "alpha_inverse", None)
    if callable(inverse):
        t = inverse(1.0 - m)
    else:
        t = _closed_form_time(schedule, m)
        if t is None:
            lo, hi = torch.zeros_like(m), torch.ones_like(m)
            for _ in range(BISECTION_STEPS):
                mid = 0.5 * (lo + hi)
                below = (1.0 - schedule.alpha(mid)) < m
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            t = hi
    return torch.nan_to_num(t.to(torch.float64), nan=0.0).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Envelopes: proposal times and relative hazards h_j(s) / h̄(s)
# --------------------------------------------------------------------------------------------


class _Envelope:
    """What the thinning loop asks of an envelope; the last three have the exact defaults.

    ``propose(t, n, u, active) -> (s, candidate)``: the next proposal time per sequence (from time t
    with n masked positions and a uniform u ∈ (0, 1]) and whether it is a candidate event.
    ``rel(s) -> (B, V)`` the relative hazards h_j(s)/h̄(s) ∈ [0, 1], or None when they are all 1.
    """

    def propose(self, t: Tensor, n: Tensor, u: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def rel(self, s: Tensor) -> Tensor | None:
        return None

    def accept(self, u: Tensor, n: Tensor, total: Tensor) -> Tensor:
        """Accept with probability R/(n h̄) = total / n (total = Σ_l Σ_j μ_lj rel_j)."""
        return u * n < total

    def position(self, weights: Tensor, u: Tensor) -> Tensor:
        """The unmasked position ∝ weights (k, L) = Σ_j μ_lj rel_j."""
        return _inverse_cdf(weights, u[:, None])[:, 0]

    def token_weights(self, mu: Tensor, rel: Tensor | None) -> Tensor:
        """The token of the chosen position ∝ μ_j rel_j."""
        return mu if rel is None else mu * rel


class _ScalarEnvelope(_Envelope):
    """h̄ = h (a scalar schedule): the next time of the first of n unmaskings, exactly.

    Each masked position unmasks at its own time τ, with P(τ ≤ s | τ ≤ t) = (1 - α_s)/(1 - α_t);
    the next event is the largest of n such times: P(max ≤ s) = ((1 - α_s)/(1 - α_t))^n, so
    1 - α_s = (1 - α_t) u^{1/n} with u uniform. Below 1 - α(0) (a mask the forward process keeps at
    t = 0, probability ε for clipped schedules) the event is put at s = 0.
    """

    def __init__(self, schedule: Schedule, batch: int, device: torch.device) -> None:
        self.schedule = schedule
        self.m = 1.0 - schedule.alpha(torch.ones(batch, dtype=torch.float64, device=device))  # 1 - α_t

    def propose(self, t: Tensor, n: Tensor, u: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        m_s = self.m * torch.exp(torch.log(u) / n.clamp_min(1))
        s = torch.minimum(time_at_mask_probability(self.schedule, m_s), t)
        self.m = torch.where(active, 1.0 - self.schedule.alpha(s), self.m)
        return s, torch.ones_like(active)


class _GenMD4Envelope(_Envelope):
    """GenMD4: h_j(t) = w_j / t, h̄ = w_max / t; the first event of rate n w_max / t after t is at
    s = t · u^{1/(n w_max)} (P(no event in [s, t]) = (s/t)^{n w_max}); h_j / h̄ = w_j / w_max."""

    def __init__(self, schedule: GenMD4Schedule) -> None:
        w = schedule.exponents.detach().to(torch.float64)
        self.w_max = w.max()
        self.ratio = (w / self.w_max)[None]  # (1, V)

    def propose(self, t: Tensor, n: Tensor, u: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        return t * torch.exp(torch.log(u) / (n.clamp_min(1) * self.w_max)), torch.ones_like(active)

    def rel(self, s: Tensor) -> Tensor:
        return self.ratio.expand(s.shape[0], -1)


class _IntervalEnvelope(_Envelope):
    """A constant bound b ≥ max_j h_j on [t_lo, t], t_lo = t/2, refreshed when a proposal leaves it.

    b comes from ``schedule.hazard_bound(t_lo, t_hi) -> (B,)`` (a per-token schedule may provide
    it), else for GenMD4 b = w_max / t_lo (h_j = w_j / t decreases in t). h_j(s) comes from
    ``schedule.weight``; a value above b means the bound is wrong and stops sampling.
    """

    def __init__(self, schedule: Schedule, vocab_size: int, batch: int, device: torch.device) -> None:
        self.schedule, self.vocab_size = schedule, vocab_size
        self.tokens = torch.arange(vocab_size, device=device)
        self.lo = torch.full((batch,), 0.5, dtype=torch.float64, device=device)
        self.bound = self._bound(self.lo, torch.ones_like(self.lo))

    def _bound(self, lo: Tensor, hi: Tensor) -> Tensor:
        custom = getattr(self.schedule, "hazard_bound", None)
        if callable(custom):
            return torch.as_tensor(custom(lo, hi), dtype=torch.float64, device=lo.device).expand(lo.shape)
        return self.schedule.exponents.detach().to(torch.float64).max() / lo

    def propose(self, t: Tensor, n: Tensor, u: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        s = t + torch.log(u) / (n.clamp_min(1) * self.bound)
        leave = s < self.lo
        s = torch.where(leave, self.lo, s)
        if bool((leave & active).any()):
            refresh = leave & active
            lo = torch.where(refresh, 0.5 * s, self.lo)
            self.bound = torch.where(refresh, self._bound(lo, s), self.bound)
            self.lo = lo
        return s, ~leave

    def rel(self, s: Tensor) -> Tensor:
        b = s.shape[0]
        h = self.schedule.weight(s[:, None].expand(b, self.vocab_size), self.tokens.expand(b, -1)).to(torch.float64)
        rel = h / self.bound[:, None]
        if bool((rel > 1.0 + 1e-9).any()):
            raise RuntimeError("genmd4-exact: the schedule's hazard_bound is below its hazard -α'/(1 - α); "
                               "thinning needs an upper bound")
        return rel


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _position_weights(ctx: SamplingContext, logits: Tensor, masked: Tensor, rows: Tensor, rel: Tensor | None) -> Tensor:
    """(B, L) float64: Σ_j μ_lj rel_j at the masked positions of ``rows`` (1 there for a scalar
    schedule, where rel is None), 0 elsewhere; μ in chunks of ``DRAW_CHUNK_ELEMENTS`` // V rows."""
    use = masked & rows[:, None]
    if rel is None:
        return use.to(torch.float64)
    out = torch.zeros(use.shape, dtype=torch.float64, device=use.device)
    bi, li = use.nonzero(as_tuple=True)
    for part in _row_chunks(bi.numel(), ctx.vocab_size):
        b, pos = bi[part], li[part]
        out[b, pos] = (ctx.mu(logits[b, pos]) * rel[b]).sum(-1)
    return out


def _draw_tokens(ctx: SamplingContext, weights: Tensor, u: Tensor) -> Tensor:
    """Tokens ∝ weights (k, V) float64: inverse CDF with the float64 uniforms u (k,), or with
    ``precision="float32"`` the reference float32 Gumbel-max on log weights."""
    if ctx.precision == "float32":
        return gumbel_max_float32(torch.log(weights).to(torch.float32), ctx.generator)
    return _inverse_cdf(weights, u[:, None])[:, 0]


def _next_candidates(ctx: SamplingContext, envelope: _Envelope, t: Tensor, n: Tensor,
                     active: Tensor) -> tuple[Tensor, Tensor, int]:
    """Propose, for every active sequence, until it holds a proposal that needs μ: a candidate event
    (not an interval boundary) with u < max_j h_j(s)/h̄(s) (otherwise R/(n h̄) ≤ u and it is
    rejected without a network call). Two float64 uniforms per sequence per round (time,
    acceptance). Returns (the times, the acceptance uniforms, the proposals rejected without a call)."""
    gen, dev, f64 = ctx.generator, ctx.device, torch.float64
    pending, u_accept, lazy = active.clone(), torch.zeros_like(t), 0
    while True:
        u = torch.rand(2, t.shape[0], generator=gen, device=dev, dtype=f64)
        s, candidate = envelope.propose(t, n, 1.0 - u[0], pending)  # 1 - u ∈ (0, 1]
        t = torch.where(pending, s, t)
        rel = envelope.rel(t)
        candidate &= pending
        ok = candidate if rel is None else candidate & (u[1] < rel.amax(-1))
        lazy += int((candidate & ~ok).sum())
        u_accept = torch.where(ok, u[1], u_accept)
        pending &= ~ok
        if not bool(pending.any()):
            return t, u_accept, lazy


def _event_loop(ctx: SamplingContext, envelope: _Envelope) -> None:
    """Simulate the reverse process from t = 1 until no free position is masked (module docstring).

    One network call per pass, at each active sequence's proposal time; then the accepted sequences
    unmask one position each (two more float64 uniforms per sequence: position, token).
    """
    z, b = ctx.z, ctx.batch_size
    masked = ctx.masked()
    n = masked.sum(1)
    t = torch.ones(b, dtype=torch.float64, device=ctx.device)
    info, bar, step, times, lazy = ctx.info, ctx.bar(int(n.sum())), 0, [], 0
    while True:
        active = n > 0
        if not bool(active.any()):
            break
        t, u_accept, rejected_free = _next_candidates(ctx, envelope, t, n, active)
        lazy += rejected_free
        u = torch.rand(2, b, generator=ctx.generator, device=ctx.device, dtype=torch.float64)  # position, token
        rel = envelope.rel(t)
        logits = ctx.denoise(z, t)
        weights = _position_weights(ctx, logits, masked, active, rel)
        accept = active & envelope.accept(u_accept, n, weights.sum(1)) if rel is not None else active
        rows = accept.nonzero(as_tuple=True)[0]
        z = z.clone()
        if rows.numel():
            pos = envelope.position(weights[rows], u[0, rows])
            token_w = envelope.token_weights(ctx.mu(logits[rows, pos]), None if rel is None else rel[rows])
            z[rows, pos] = _draw_tokens(ctx, token_w, u[1, rows])
            masked = masked.clone()
            masked[rows, pos] = False
            n = n - accept.long()
        step += 1
        info.proposals += int(active.sum())
        info.rejected += int((active & ~accept).sum())
        times.append(torch.where(active, t, torch.full_like(t, math.nan)))
        z = ctx.advance(z, step, last=not bool((n > 0).any()))
        bar.update(rows.numel())
    bar.close()
    info.num_steps = step
    info.times = torch.empty(0, dtype=torch.float64)
    info.extras["event_times"] = torch.stack(times).cpu() if times else torch.empty(0, b, dtype=torch.float64)
    info.extras["lazy_rejected"] = lazy


# --------------------------------------------------------------------------------------------
# The samplers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstHitting(Sampler):
    """``first-hitting``: exact simulation of the continuous-time model for scalar schedules.

    From time t with n masked free positions (per sequence): draw the time s of the next
    unmasking from its exact law, 1 - α_s = (1 - α_t) u^{1/n} (α⁻¹ by
    :func:`time_at_mask_probability`), pick the position uniformly among the masked ones, and draw
    its token from μ(z, s) (temperature, top-k, top-p applied). Exactly one token per sequence per
    network call, no time grid (``num_steps`` and ``grid`` are ignored), no discretisation error.
    With a time-agnostic denoiser this is random-order autoregressive sampling.

    ``SampleInfo``: ``num_steps`` = network calls = the largest number of free positions of a
    sequence; ``extras["event_times"]`` (calls, B) the time of each sequence's event (NaN once
    it is done). Per-token schedules are refused (use ``genmd4-exact``).
    """

    name: ClassVar[str] = "first-hitting"
    exact: ClassVar[bool] = True
    preserves: ClassVar[str] = ("the continuous-time model exactly (no time grid); changes nothing, "
                                "one token per network call")
    calls: ClassVar[str] = "exactly the number of free positions (L minus the fixed ones)"
    uses_grid: ClassVar[bool] = False

    def check_schedule(self, schedule: Schedule) -> None:
        if bool(getattr(schedule, "per_token", False)):
            raise ValueError("the 'first-hitting' sampler needs a scalar schedule: with a per-token schedule "
                             "(GenMD4) the unmasking rate depends on the token; use sampler='genmd4-exact'")

    def run(self, ctx: SamplingContext) -> None:
        _event_loop(ctx, _ScalarEnvelope(ctx.schedule, ctx.batch_size, ctx.device))


@dataclass(frozen=True)
class GenMD4Exact(Sampler):
    """``genmd4-exact``: exact simulation of the continuous-time model for per-token schedules, by thinning.

    A masked position unmasks into token j at rate μ_j(z, t) h_j(t), h_j = -α'_{t,j}/(1 - α_{t,j}).
    Proposals come from a Poisson process of rate n·h̄(t) ≥ the total rate (n masked positions,
    h̄ ≥ max_j h_j); a proposal at s costs one network call (μ at (z, s)) and is accepted with
    probability Σ_l Σ_j μ_lj h_j(s) / (n h̄(s)); then the position l is drawn ∝ Σ_j μ_lj h_j(s)
    and its token ∝ μ_lj h_j(s). Module docstring and docs/math.md, "Exact continuous-time
    sampling", give the envelopes and the proof.

    Options: ``proposals="envelope"`` (default) uses h̄ = max_j h_j exactly where it integrates in
    closed form (GenMD4: w_max / t; scalar schedules: h); ``"interval"`` uses a constant bound per
    interval [t/2, t] (needed for per-token schedules other than GenMD4, which must then provide
    ``hazard_bound(t_lo, t_hi)``).

    Expected network calls per sequence: the expected number of proposals that need μ; with the
    envelope for GenMD4, Σ_l E[w_max / w_{x_l}] over the generated tokens x (equal to L when all
    exponents are equal), and exactly the number of free positions for a scalar schedule, where
    every proposal is accepted and the sampler is ``first-hitting`` (same random stream, same
    tokens). ``SampleInfo``: ``proposals`` and ``rejected`` (summed over sequences: proposals that
    cost a call and were rejected), ``extras["lazy_rejected"]`` (interval proposals rejected
    without a call), ``extras["event_times"]``.
    """

    name: ClassVar[str] = "genmd4-exact"
    exact: ClassVar[bool] = True
    preserves: ClassVar[str] = ("the continuous-time model exactly, per-token (GenMD4) or scalar schedules; "
                                "rejected proposals cost calls but change nothing")
    calls: ClassVar[str] = "random: Σ_l E[w_max / w_{x_l}] for GenMD4 (≥ the number of free positions)"
    uses_grid: ClassVar[bool] = False

    proposals: Literal["envelope", "interval"] = field(
        default="envelope", metadata={"help": "envelope: h̄ = max_j h_j in closed form; interval: a bound per [t/2, t]"})

    def check_schedule(self, schedule: Schedule) -> None:
        if not bool(getattr(schedule, "per_token", False)):
            return
        if type(schedule) is not GenMD4Schedule and not callable(getattr(schedule, "hazard_bound", None)):
            raise ValueError("the 'genmd4-exact' sampler needs a GenMD4Schedule, a scalar schedule, or a per-token "
                             "schedule with hazard_bound(t_lo, t_hi) (an upper bound of max_j h_j on the interval)")

    def envelope(self, ctx: SamplingContext) -> _Envelope:
        """The envelope for ``ctx.schedule`` (module docstring)."""
        if not ctx.per_token:
            return _ScalarEnvelope(ctx.schedule, ctx.batch_size, ctx.device)
        if self.proposals == "envelope" and type(ctx.schedule) is GenMD4Schedule:
            return _GenMD4Envelope(ctx.schedule)
        return _IntervalEnvelope(ctx.schedule, ctx.vocab_size, ctx.batch_size, ctx.device)

    def run(self, ctx: SamplingContext) -> None:
        _event_loop(ctx, self.envelope(ctx))
