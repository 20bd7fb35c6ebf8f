"""Ordered and adaptive unmasking: confidence / margin / entropy order, threshold, entropy-bounded.

These samplers are **approximate** by design: they do not draw from the model's distribution.
Each step asks the denoiser for μ = softmax(logits) at every masked position, ranks the masked
positions by a *score*, unmasks the best-ranked ones and draws their tokens; the others stay
masked. Unmasked tokens are never changed (no remasking), fixed tokens are never masked, so
they are never touched.

Scores (higher = unmasked first), from the model's **raw** prediction μ = softmax(logits):

* ``confidence``: c_i = max_j μ_ij, the probability of the most likely token (MaskGIT, LLaDA's
  "low_confidence" and Dream's "maskgit_plus" rank by the probability of the token drawn, which
  is this one at temperature 0);
* ``margin``: μ_i(1) − μ_i(2), the top-1 minus the top-2 probability (Dream "topk_margin");
* ``entropy``: −H_i with H_i = −Σ_j μ_ij log μ_ij, i.e. lowest entropy first (Dream "entropy").

The score uses the raw μ, *not* the distribution the token is drawn from (μ after temperature,
top-k and top-p, :func:`~maskdiff.sampling.categorical.transform_logits`). So the order in which
positions are filled is the model's own certainty and does not move with the sampling knobs: a
temperature sweep changes only the tokens drawn, and temperature 0 (greedy tokens) still has a
meaningful order (with transformed scores every greedy confidence is 1, a tie everywhere).
Ties are broken by position, leftmost first (a stable sort).

Token draws: float64 inverse CDF of the transformed μ (one uniform per unmasked position, in
row-major order of the positions), or with ``precision="float32"`` the reference float32
Gumbel-max draw (:func:`~maskdiff.sampling.categorical.gumbel_max_float32`).

How many positions a step unmasks
---------------------------------
* :func:`unmask_counts` (the ``confidence``/``margin``/``entropy`` samplers; MaskGIT / LLaDA /
  Dream): the number the schedule expects. A sequence with M free positions, all masked at
  t_0 = 1, has in expectation M · f_i masks left at grid time t_i under the ancestral sampler,
  f_i = (1 − α(t_i)) / (1 − α(t_0)). After step i the sampler has unmasked exactly
  U_i = ⌊M (1 − f_i) + 1/2⌋ positions (round half up), and U_T = M: the last step unmasks
  whatever is left, so **every mask is gone after T steps**. Step i unmasks k_i = U_i − U_{i−1}
  ≥ 0 (α is monotone); a step in which no sequence unmasks anything makes no network call. With
  the linear schedule and the cosine grid, f_i = cos(π/2 · i/T) is MaskGIT's cosine schedule; with
  the uniform grid it is LLaDA's equal split (up to rounding).
* :func:`threshold_step`: every masked position with confidence c_i ≥ τ, and at least the most
  confident one. τ > 1 unmasks exactly one position per call (confidence order, one at a time).
* :func:`entropy_bounded_step` (EB-sampler, Ben-Hamu et al. 2025): the masked positions sorted by
  the score; the first k of them with the largest k such that Σ_{i≤k} H_i − max_{i≤k} H_i < γ,
  and at least one. The strict inequality makes γ = 0 unmask exactly one position per call
  whatever the entropies (with ≤, positions of exactly zero entropy would go together).

Threshold and entropy-bounded decoding have no time grid: the denoiser is called at the time at
which the ancestral sampler expects the current fraction of masks, t with
(1 − α(t)) / (1 − α(1)) = (masks left) / M (:func:`time_for_masked_fraction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import Tensor

from maskdiff.sampling.base import Sampler
from maskdiff.sampling.categorical import (
    Precision,
    _check_logit_rows,
    _check_precision,
    _check_transform_args,
    _row_chunks,
    _softmax,
)
from maskdiff.sampling.context import SamplingContext
from maskdiff.sampling.steps import _mean_token_draw
from maskdiff.schedules import Schedule

__all__ = [
    "ConfidenceOrder",
    "MarginOrder",
    "EntropyOrder",
    "Threshold",
    "EntropyBounded",
    "SCORES",
    "position_scores",
    "select_best",
    "unmask_counts",
    "time_at_alpha",
    "time_for_masked_fraction",
    "ordered_step",
    "threshold_step",
    "entropy_bounded_step",
]

#: The ordering scores, by name.
SCORES = ("confidence", "margin", "entropy")


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")


def _entropy(mu: Tensor) -> Tensor:
    """H = −Σ_j μ_j log μ_j over the last dim (0 log 0 = 0), float64 μ (N, V) → (N,)."""
    plogp = (mu * torch.log(mu.clamp_min(1e-300))).sum(-1)
    return (-plogp).clamp_min(0.0)


def position_scores(logits: Tensor, score: str = "confidence") -> tuple[Tensor, Tensor]:
    """Scores and entropies of rows (N, V) of raw logits, in float64: ((N,), (N,)).

    The score is c = max_j μ_j (``confidence``), μ_(1) − μ_(2) (``margin``; μ_(1) alone when V = 1)
    or −H (``entropy``), with μ = softmax(logits); higher means "unmask first". The entropies H
    are returned as well (the entropy-bounded rule needs them whatever the order).
    """
    _check_score(score)
    _check_logit_rows(logits)
    mu = _softmax(logits.to(torch.float64))
    ent = _entropy(mu)
    if score == "confidence":
        return mu.amax(-1), ent
    if score == "margin":
        top = mu.topk(min(2, mu.shape[-1]), dim=-1).values
        return (top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]), ent
    return -ent, ent


def select_best(scores: Tensor, k: Tensor) -> Tensor:
    """The ``k[b]`` best positions of each row: scores (B, L) float (−inf = not a candidate), k (B,).

    Returns a bool (B, L) marking, in every row b, the min(k[b], candidates in b) positions of
    highest score; ties go to the leftmost position (stable sort). Never marks a −inf position.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (B, L)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return (rank < k[:, None]) & (scores > -math.inf)


def unmask_counts(alphas: Tensor, free: Tensor) -> Tensor:
    """How many positions each step of the ordered sampler unmasks: (T, B) long.

    ``alphas``: α at the grid times t_0 > … > t_T, (T + 1,) (float64; t_0 = 1 for the built-in
    grids). ``free``: M, the masked positions of each sequence at t_0, (B,). Step i unmasks
    k_i = U_i − U_{i−1}, with U_i = ⌊M (1 − f_i) + 1/2⌋, f_i = (1 − α_i)/(1 − α_0) the masked
    fraction the ancestral sampler expects at t_i, U_0 = 0 and U_T = M (the last step takes
    what is left). Σ_i k_i = M.
    """
    a = alphas.to(torch.float64).flatten()
    if a.numel() < 2:
        raise ValueError("unmask_counts needs α at T + 1 ≥ 2 grid times")
    if float(a[0]) >= 1.0:
        raise ValueError("α at the first grid time must be below 1 (some position must be masked at t_0)")
    frac = ((1.0 - a) / (1.0 - a[0])).clamp(0.0, 1.0)  # (T + 1,), f_0 = 1
    m = free.to(torch.float64)
    target = torch.floor(m[None, :] * (1.0 - frac[:, None]) + 0.5)  # (T + 1, B)
    target = torch.cummax(target, dim=0).values  # α monotone: guard rounding of a flat stretch
    target[0] = 0.0
    target[-1] = m
    return (target[1:] - target[:-1]).clamp_min(0).to(torch.long)


def time_at_alpha(schedule: Schedule, alpha: Tensor, *, iterations: int = 60) -> Tensor:
    """The time t (B,) with α(t) = ``alpha`` (B,) for a scalar schedule (α decreasing in t).

    Bisection on [0, 1] in float64 (``iterations`` halvings: 2^-60 of the interval); α above
    α(0) gives t = 0, α below α(1) gives t = 1.
    """
    if bool(getattr(schedule, "per_token", False)):
        raise ValueError("this sampler needs a scalar schedule: a per-token (GenMD4) schedule has no single "
                         "time for a masked fraction; use sampler='ancestral'")
    target = alpha.to(torch.float64)
    lo, hi = torch.zeros_like(target), torch.ones_like(target)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = schedule.alpha(mid).to(torch.float64) > target  # α too large: t too small
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return hi


def time_for_masked_fraction(schedule: Schedule, frac: Tensor) -> Tensor:
    """The time t (B,) at which the ancestral sampler expects the masked fraction ``frac`` (B,).

    Solves (1 − α(t)) / (1 − α(1)) = frac (:func:`time_at_alpha`); frac = 1 gives t = 1 exactly, a
    fraction below what α reaches at t = 0 gives t = 0.
    """
    f = frac.to(torch.float64).clamp(0.0, 1.0)
    alpha_1 = schedule.alpha(torch.ones(1, dtype=torch.float64, device=f.device)).to(torch.float64)
    t = time_at_alpha(schedule, 1.0 - f * (1.0 - alpha_1))
    return torch.where(f >= 1.0, torch.ones_like(t), t)


def _check_step(z: Tensor, logits: Tensor, precision: str, transform: dict[str, Any]) -> tuple[int, int, int]:
    _check_precision(precision)
    _check_transform_args(**transform)
    if z.dim() != 2 or z.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"z must be an integer tensor of shape (B, L), got {z.dtype} {tuple(z.shape)}")
    b, l = z.shape
    if not isinstance(logits, Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (b, l):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (B, L, V) = ({b}, {l}, V), got {shape}")
    return b, l, int(logits.shape[-1])


def _masked_scores(z: Tensor, logits: Tensor, score: str, candidates: Tensor | None) -> tuple[Tensor, Tensor]:
    """Scores and entropies (B, L) float64 of the candidate positions (default: the masked ones of
    z); −inf / +inf elsewhere."""
    v = logits.shape[-1]
    masked = z == v
    if candidates is not None:
        masked &= candidates
    bi, li = masked.nonzero(as_tuple=True)
    scores = torch.full(z.shape, -math.inf, dtype=torch.float64, device=z.device)
    ents = torch.full(z.shape, math.inf, dtype=torch.float64, device=z.device)
    for part in _row_chunks(bi.numel(), v):
        s, h = position_scores(logits[bi[part], li[part]], score)
        scores[bi[part], li[part]] = s
        ents[bi[part], li[part]] = h
    return scores, ents


def _unmask(z: Tensor, logits: Tensor, chosen: Tensor, generator: torch.Generator | None, precision: str,
            transform: dict[str, Any]) -> Tensor:
    """z with the ``chosen`` (B, L) positions set to tokens drawn from the transformed μ there."""
    out = z.clone()
    bi, li = chosen.nonzero(as_tuple=True)
    n = bi.numel()
    if not n:
        return out
    v = logits.shape[-1]
    u = torch.rand(n, 1, generator=generator, device=z.device, dtype=torch.float64) if precision == "float64" else None
    for part in _row_chunks(n, v):
        out[bi[part], li[part]] = _mean_token_draw(logits[bi[part], li[part]], None if u is None else u[part],
                                                   generator, transform)
    return out


def ordered_step(
    z: Tensor,
    logits: Tensor,
    k: Tensor,
    *,
    score: str = "confidence",
    generator: torch.Generator | None = None,
    precision: Precision = "float64",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    candidates: Tensor | None = None,
) -> Tensor:
    """Unmask the ``k[b]`` best-scored masked positions of every row b. Returns a new z (B, L).

    Args:
        z: (B, L) tokens, mask id V at masked positions.
        logits: the denoiser's raw logits (B, L, V) at z; the scores use softmax(logits).
        k: (B,) how many positions to unmask per row (clamped to the masks the row has).
        score: ``"confidence"``, ``"margin"`` or ``"entropy"`` (see the module docstring).
        temperature, top_k, top_p: applied to the logits the *tokens* are drawn from.
        candidates: (B, L) bool, the positions that may be unmasked (default: every masked one;
            block generation passes the masked positions of the current block).
    """
    transform = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    b, _, _ = _check_step(z, logits, precision, transform)
    _check_score(score)
    k = torch.as_tensor(k, device=z.device).expand(b)
    scores, _ = _masked_scores(z, logits, score, candidates)
    return _unmask(z, logits, select_best(scores, k), generator, precision, transform)


def threshold_step(
    z: Tensor,
    logits: Tensor,
    threshold: float,
    *,
    generator: torch.Generator | None = None,
    precision: Precision = "float64",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    candidates: Tensor | None = None,
) -> Tensor:
    """Unmask every masked position with confidence max_j μ_j ≥ ``threshold`` (τ), and at least the
    most confident one of each row that has a mask. Arguments as :func:`ordered_step`."""
    transform = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    _check_step(z, logits, precision, transform)
    scores, _ = _masked_scores(z, logits, "confidence", candidates)
    k = (scores >= threshold).sum(-1).clamp_min(1)  # the top-k by confidence are exactly those ≥ τ
    return _unmask(z, logits, select_best(scores, k), generator, precision, transform)


def entropy_bounded_step(
    z: Tensor,
    logits: Tensor,
    gamma: float,
    *,
    score: str = "entropy",
    generator: torch.Generator | None = None,
    precision: Precision = "float64",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    candidates: Tensor | None = None,
) -> Tensor:
    """EB-sampler step: in the order of ``score``, unmask the first k masked positions with the largest
    k such that Σ_{i≤k} H_i − max_{i≤k} H_i < γ (at least one per row with a mask).

    Σ − max is non-decreasing in k, so k is the number of prefixes that satisfy the bound. γ = 0
    unmasks exactly one position per row. Arguments as :func:`ordered_step`; H in nats.
    """
    transform = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    b, l, _ = _check_step(z, logits, precision, transform)
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number ≥ 0, got {gamma!r}")
    scores, ents = _masked_scores(z, logits, score, candidates)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    h = ents.gather(-1, order)  # (B, L): entropies in unmasking order, +inf after the masked ones
    finite = torch.isfinite(h)
    h0 = torch.where(finite, h, torch.zeros_like(h))
    excess = h0.cumsum(-1) - torch.cummax(h0, dim=-1).values  # Σ_{i≤k} H_i − max_{i≤k} H_i
    k = ((excess < gamma) & finite).sum(-1).clamp_min(1)
    return _unmask(z, logits, select_best(scores, k), generator, precision, transform)


# --------------------------------------------------------------------------------------------
# The samplers (maskdiff.sample(..., sampler=NAME))
# --------------------------------------------------------------------------------------------


def require_scalar_schedule(name: str, schedule: Schedule) -> None:
    """ValueError (one line) for a per-token (GenMD4) schedule, which these samplers cannot use."""
    if bool(getattr(schedule, "per_token", False)):
        raise ValueError(f"the {name!r} sampler needs a scalar schedule: with a per-token (GenMD4) schedule the "
                         "expected masked fraction depends on the token; use sampler='ancestral'")


def _draws(ctx: SamplingContext) -> dict[str, Any]:
    """The draw settings of the context, as the keyword arguments of the steps above."""
    return dict(generator=ctx.generator, precision=ctx.precision, temperature=ctx.temperature, top_k=ctx.top_k,
                top_p=ctx.top_p)


@dataclass(frozen=True)
class ConfidenceOrder(Sampler):
    """Confidence-ordered unmasking (MaskGIT / LLaDA / Dream): each grid step unmasks the number of
    positions the schedule expects (:func:`unmask_counts`), the most confident first (max_j μ_j of
    the raw μ); tokens are drawn from μ after temperature/top-k/top-p. Every mask is gone after
    ``num_steps`` steps; a step that unmasks nothing in any sequence makes no call. The network
    sees the grid time t_i. Scalar schedules only."""

    name: ClassVar[str] = "confidence"
    exact: ClassVar[bool] = False
    score: ClassVar[str] = "confidence"
    preserves: ClassVar[str] = ("the expected number of masks per step and the token law μ at each unmasked "
                                "position; changes which positions unmask (best-scored first, not at random)")
    calls: ClassVar[str] = "≤ num_steps: one per grid step in which some sequence unmasks a position"

    def check_schedule(self, schedule: Schedule) -> None:
        require_scalar_schedule(self.name, schedule)

    def run(self, ctx: SamplingContext) -> None:
        alphas = ctx.schedule.alpha(ctx.times).to(torch.float64)
        counts = unmask_counts(alphas, ctx.masked().sum(1))  # (T, B)
        for i in ctx.steps(ctx.num_steps):
            if not bool(counts[i].any()):
                ctx.info.lazy_skips += 1
                ctx.advance(ctx.z, i + 1)
                continue
            logits = ctx.denoise(ctx.z, ctx.times[i])
            ctx.advance(ordered_step(ctx.z, logits, counts[i], score=self.score, candidates=ctx.free, **_draws(ctx)),
                        i + 1)


@dataclass(frozen=True)
class MarginOrder(ConfidenceOrder):
    """As ``confidence``, ranking by the margin μ_(1) − μ_(2) of the raw μ (largest first)."""

    name: ClassVar[str] = "margin"
    score: ClassVar[str] = "margin"


@dataclass(frozen=True)
class EntropyOrder(ConfidenceOrder):
    """As ``confidence``, ranking by the entropy of the raw μ (lowest first)."""

    name: ClassVar[str] = "entropy"
    score: ClassVar[str] = "entropy"


def _adaptive_loop(ctx: SamplingContext, step: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
    """Call ``step(z, logits, candidates)`` until no free position is masked (each call unmasks at
    least one per sequence that has masks). The network sees, per sequence, the time at which the
    ancestral sampler expects its fraction of masks (:func:`time_for_masked_fraction`). Every call
    evaluates the whole batch (a denoiser may hold per-row data, e.g. class labels), so a batch
    costs as many calls as its slowest sequence needs."""
    masked = ctx.masked()
    start = masked.sum(1).clamp_min(1)
    bar = ctx.bar(int(masked.sum()))
    n = 0
    while bool(masked.any()):
        t = time_for_masked_fraction(ctx.schedule, masked.sum(1) / start)
        z_new = step(ctx.z, ctx.denoise(ctx.z, t), masked)
        n += 1
        left = ctx.masked(z_new)
        ctx.advance(z_new, n, last=not bool(left.any()))
        bar.update(int(masked.sum() - left.sum()))
        masked = left
    bar.close()
    ctx.info.num_steps = n


@dataclass(frozen=True)
class Threshold(Sampler):
    """Threshold parallel decoding: each call unmasks every masked position whose confidence
    max_j μ_j (raw μ) is at least τ, and at least the most confident one. No grid (``num_steps``
    and ``grid`` are ignored). Scalar schedules only (for the time the network sees)."""

    name: ClassVar[str] = "threshold"
    exact: ClassVar[bool] = False
    uses_grid: ClassVar[bool] = False
    preserves: ClassVar[str] = ("the token law μ at each unmasked position; changes the order and the number "
                                "unmasked together (all positions above τ at once)")
    calls: ClassVar[str] = ("adaptive, ≤ the most free positions of a sequence in the batch (τ > 1: exactly that, "
                            "one token per call)")

    threshold: float = field(default=0.9, metadata={
        "help": "τ ≥ 0: unmask every masked position with confidence ≥ τ (at least one per call); τ > 1: one per call"})

    def validate(self) -> None:
        self.require(math.isfinite(self.threshold) and self.threshold >= 0, f"threshold must be ≥ 0, got {self.threshold}")

    def check_schedule(self, schedule: Schedule) -> None:
        require_scalar_schedule(self.name, schedule)

    def run(self, ctx: SamplingContext) -> None:
        draws = _draws(ctx)
        _adaptive_loop(ctx, lambda z, logits, cand: threshold_step(z, logits, self.threshold, candidates=cand, **draws))


@dataclass(frozen=True)
class EntropyBounded(Sampler):
    """EB-sampler (Ben-Hamu et al. 2025, "Accelerated Sampling from Masked Diffusion Models via
    Entropy Bounded Unmasking"): each call takes the masked positions in the order of ``score`` and
    unmasks the longest prefix whose entropies (nats, raw μ) satisfy Σ H − max H < γ, at least one.
    γ = 0: exactly one token per call. No grid; scalar schedules only."""

    name: ClassVar[str] = "entropy-bounded"
    exact: ClassVar[bool] = False
    uses_grid: ClassVar[bool] = False
    preserves: ClassVar[str] = ("the token law μ at each unmasked position; changes the order and unmasks "
                                "together positions whose summed entropy (minus the largest) stays below γ")
    calls: ClassVar[str] = ("adaptive, ≤ the most free positions of a sequence in the batch (γ = 0: exactly that, "
                            "one token per call)")

    gamma: float = field(default=0.5, metadata={
        "help": "γ ≥ 0 in nats: unmask the ordered positions while Σ H − max H < γ (at least one); 0: one per call"})
    score: Literal["entropy", "confidence", "margin"] = field(default="entropy", metadata={
        "help": "the order in which positions are considered: entropy (lowest first), confidence or margin"})

    def validate(self) -> None:
        self.require(math.isfinite(self.gamma) and self.gamma >= 0, f"gamma must be a number ≥ 0, got {self.gamma}")

    def check_schedule(self, schedule: Schedule) -> None:
        require_scalar_schedule(self.name, schedule)

    def run(self, ctx: SamplingContext) -> None:
        draws = _draws(ctx)
        _adaptive_loop(ctx, lambda z, logits, cand: entropy_bounded_step(
            z, logits, self.gamma, score=self.score, candidates=cand, **draws))
