"""ReMDM: remasking during sampling (Wang, Schiff, Sahoo and Kuleshov 2025, "Remasking Discrete
Diffusion Models with Inference-Time Scaling", arXiv 2503.00307).

An **approximate** sampler: unmasked tokens may be masked again and redrawn later, which can
correct early mistakes. The reverse step from t to s < t keeps the MD4 marginals of the
forward process but changes the joint law (docs/math.md, "Sampling"): with α_t, α_s of a scalar
schedule and a remasking probability σ_t ∈ [0, σ_max], σ_max = min(1, (1 − α_s)/α_t),

    unmasked position (z_t = x):  stays x with 1 − σ_t, becomes the mask m with σ_t;
    masked position  (z_t = m):  becomes token j with μ_j (α_s − (1 − σ_t) α_t)/(1 − α_t),
                                 stays m with (1 − α_s − σ_t α_t)/(1 − α_t).

σ_t = 0 is the MD4 ancestral step. The masked half is the ancestral step from α_t to
α'_s = α_s + σ_t α_t (its unmasking probability (α'_s − α_t)/(1 − α_t) is the one above), so
:func:`remdm_step` runs :func:`~maskdiff.sampling.steps.ancestral_step` with α'_s and then draws
one float64 uniform per position that was unmasked at t (fixed tokens excluded): with σ_t = 0
no uniform is drawn, so ReMDM with η = 0 consumes the random stream exactly as the ancestral
sampler and gives **bitwise** the same tokens with the same generator.

Strategies for σ_t (η ≥ 0 the knob):

* ``cap``: σ_t = min(η, σ_max) (ReMDM "max-capped");
* ``rescale``: σ_t = η · σ_max with η ∈ [0, 1] (ReMDM "rescaled");
* ``loop``: three phases on the sampling clock c (the time grid, 1 → 0): for c > t_on, plain
  ancestral steps along α(c) = α(1) + (α_on − α(1))(1 − c)/(1 − t_on), which reaches α_on at t_on;
  for t_off < c ≤ t_on, α is held at α_on and every step remasks with σ = min(η, (1 − α_on)/α_on)
  (and unmasks as many in expectation: a loop at constant α that refines the text); for c ≤ t_off,
  plain steps along α(c) = α_on + (α(0) − α_on)(t_off − c)/t_off. The network sees the time t with
  α(t) = the α of the step (:func:`~maskdiff.sampling.ordered.time_at_alpha`). Knobs ``t_on``
  (default 0.55), ``t_off`` (0.05), ``alpha_on`` (0.9), the paper's OpenWebText values; a uniform
  grid puts the share t_on − t_off of the steps in the loop. With η = 0 the loop steps change
  nothing and make no network call (lazily), and the sampler is the ancestral sampler along this
  piecewise-linear α path.

Scalar schedules only: a per-token (GenMD4) schedule has no single α_t to remask with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from maskdiff.sampling.base import Sampler
from maskdiff.sampling.categorical import Precision
from maskdiff.sampling.context import SamplingContext
from maskdiff.sampling.ordered import require_scalar_schedule, time_at_alpha
from maskdiff.sampling.steps import LogitsSource, ancestral_step
from maskdiff.schedules import Schedule

__all__ = ["ReMDM", "STRATEGIES", "remdm_sigma", "remdm_step", "loop_path"]

#: The ReMDM strategies for σ_t.
STRATEGIES = ("cap", "rescale", "loop")


def sigma_max(alpha_t: float, alpha_s: float) -> float:
    """σ_max = min(1, (1 − α_s)/α_t), the largest remasking probability that keeps the masked
    positions' probabilities non-negative; 1 where α_t = 0 (nothing is unmasked there)."""
    if alpha_t <= 0.0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - alpha_s) / alpha_t))


def remdm_sigma(strategy: str, eta: float, alpha_t: float, alpha_s: float) -> float:
    """σ_t of a ``cap`` or ``rescale`` step from α_t to α_s (``loop`` steps: :func:`loop_path`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number ≥ 0, got {eta!r}")
    top = sigma_max(alpha_t, alpha_s)
    if strategy == "rescale":
        if eta > 1:
            raise ValueError(f"eta must lie in [0, 1] for strategy='rescale' (σ = η σ_max), got {eta!r}")
        return eta * top
    return min(eta, top)  # cap, and the loop phase


def remdm_step(
    z: Tensor,
    logits: LogitsSource,
    alpha_t: float,
    alpha_s: float,
    sigma: float,
    *,
    remaskable: Tensor | None = None,
    generator: torch.Generator | None = None,
    precision: Precision = "float64",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """One ReMDM step z_t → z_s with remasking probability ``sigma`` (σ_t). Returns a new z (B, L).

    Args:
        z: (B, L) tokens at t, mask id V at masked positions.
        logits: denoiser output (B, L, V) at (z, t), or a zero-argument callable (called only
            when some position may unmask, as in :func:`~maskdiff.sampling.steps.ancestral_step`).
        alpha_t, alpha_s: α of a scalar schedule at t and s (α_s ≥ α_t), as Python floats.
        sigma: σ_t in [0, σ_max] (:func:`remdm_sigma`).
        remaskable: (B, L) bool, the positions that may be remasked (False at fixed tokens);
            None: every position.
        precision, temperature, top_k, top_p, vocab_size: as for the ancestral step.

    Random numbers: those of the ancestral step from α_t to α_s + σ α_t, then (only if σ > 0) one
    float64 uniform per position unmasked at t and remaskable, in row-major order.
    """
    if not (0.0 <= sigma <= sigma_max(alpha_t, alpha_s) + 1e-12):
        raise ValueError(f"sigma must lie in [0, σ_max] = [0, {sigma_max(alpha_t, alpha_s):.6g}], got {sigma!r}")
    draw = dict(generator=generator, precision=precision, temperature=temperature, top_k=top_k, top_p=top_p,
                vocab_size=vocab_size)
    if sigma == 0.0:
        return ancestral_step(z, logits, alpha_t, alpha_s, **draw)
    v = vocab_size if vocab_size is not None else int(logits.shape[-1])  # type: ignore[union-attr]
    keep = z != v
    if remaskable is not None:
        keep &= remaskable.to(z.device).expand_as(z)
    out = ancestral_step(z, logits, alpha_t, min(1.0, alpha_s + sigma * alpha_t), **draw)
    bi, li = keep.nonzero(as_tuple=True)
    u = torch.rand(bi.numel(), generator=generator, device=z.device, dtype=torch.float64)
    hit = u < sigma
    out[bi[hit], li[hit]] = v
    return out


def loop_path(
    schedule: Schedule,
    clock: Tensor,
    *,
    eta: float,
    t_on: float = 0.55,
    t_off: float = 0.05,
    alpha_on: float = 0.9,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``loop`` strategy on the grid ``clock`` (T + 1,) (decreasing from 1 to 0).

    Returns (α (T + 1,) float64 along the piecewise-linear path of the module docstring, the
    network times t (T + 1,) with α(t) = that α, σ (T,) float64 per step: min(η, σ_max) for the
    steps that start inside the loop, t_off < c_i ≤ t_on, and 0 elsewhere).
    """
    if not 0.0 < t_off < t_on < 1.0:
        raise ValueError(f"the loop needs 0 < t_off < t_on < 1, got t_off={t_off!r}, t_on={t_on!r}")
    c = clock.to(torch.float64)
    dev = c.device
    a1 = float(schedule.alpha(torch.ones(1, dtype=torch.float64, device=dev))[0])
    a0 = float(schedule.alpha(torch.zeros(1, dtype=torch.float64, device=dev))[0])
    if not a1 < alpha_on < a0:
        raise ValueError(f"alpha_on must lie strictly between α(1) = {a1:.6g} and α(0) = {a0:.6g}, got {alpha_on!r}")
    rise = a1 + (alpha_on - a1) * (1.0 - c) / (1.0 - t_on)
    fall = alpha_on + (a0 - alpha_on) * (t_off - c) / t_off
    alpha = torch.where(c > t_on, rise, torch.where(c > t_off, torch.full_like(c, alpha_on), fall))
    times = time_at_alpha(schedule, alpha)
    times = torch.where(c >= 1.0, torch.ones_like(times), times)
    in_loop = (c[:-1] > t_off) & (c[:-1] <= t_on)
    sig = torch.tensor([remdm_sigma("cap", eta, float(alpha[i]), float(alpha[i + 1])) if bool(in_loop[i]) else 0.0
                        for i in range(len(c) - 1)], dtype=torch.float64)
    return alpha, times, sig


@dataclass(frozen=True)
class ReMDM(Sampler):
    """ReMDM remasking (module docstring): one :func:`remdm_step` per grid interval, then the
    masks left after the last step are filled with the argmax of one more call, as ``ancestral``
    does. Fixed tokens are never remasked. η = 0 (σ = 0) is ``ancestral`` bit for bit (``cap``,
    ``rescale``); ``loop`` with η = 0 is the ancestral sampler along the loop's α path."""

    name: ClassVar[str] = "remdm"
    exact: ClassVar[bool] = False
    preserves: ClassVar[str] = ("the forward process's marginals at the grid times; changes the joint law "
                                "(unmasked tokens are remasked with probability σ_t and redrawn later)")
    calls: ClassVar[str] = "≤ num_steps (+1 if masks are left; fewer with lazy evaluation)"

    strategy: Literal["cap", "rescale", "loop"] = field(default="cap", metadata={
        "help": "σ_t: cap = min(η, σ_max), rescale = η σ_max, loop = η in a loop at constant α between t_on and t_off"})
    eta: float = field(default=0.02, metadata={"help": "η ≥ 0 (≤ 1 for rescale); 0 = the ancestral sampler"})
    t_on: float = field(default=0.55, metadata={"help": "loop: grid time at which the loop starts (0 < t_off < t_on < 1)"})
    t_off: float = field(default=0.05, metadata={"help": "loop: grid time at which the loop ends"})
    alpha_on: float = field(default=0.9, metadata={"help": "loop: α held during the loop (between α(1) and α(0))"})

    def validate(self) -> None:
        self.require(math.isfinite(self.eta) and self.eta >= 0, f"eta must be a number ≥ 0, got {self.eta}")
        self.require(self.strategy != "rescale" or self.eta <= 1, f"eta must lie in [0, 1] for rescale, got {self.eta}")
        self.require(0 < self.t_off < self.t_on < 1, f"the loop needs 0 < t_off < t_on < 1, got {self.t_off}, {self.t_on}")
        self.require(0 < self.alpha_on < 1, f"alpha_on must lie in (0, 1), got {self.alpha_on}")

    def check_schedule(self, schedule: Schedule) -> None:
        require_scalar_schedule(self.name, schedule)

    def run(self, ctx: SamplingContext) -> None:
        if self.strategy == "loop":
            alphas, times, sigmas = loop_path(ctx.schedule, ctx.times, eta=self.eta, t_on=self.t_on,
                                              t_off=self.t_off, alpha_on=self.alpha_on)
        else:
            alphas, times = ctx.schedule.alpha(ctx.times).to(torch.float64), ctx.times
            sigmas = torch.tensor([remdm_sigma(self.strategy, self.eta, float(alphas[i]), float(alphas[i + 1]))
                                   for i in range(ctx.num_steps)], dtype=torch.float64)
        lazy = ctx.lazy and ctx.precision == "float64"  # as the ancestral sampler: same calls, same stream
        z = ctx.z
        for i in ctx.steps(ctx.num_steps):
            requests = ctx.calls.requests
            source: LogitsSource = (lambda z_=z, t_=times[i]: ctx.denoise(z_, t_))
            if not lazy:
                source = source()
            z_new = remdm_step(z, source, float(alphas[i]), float(alphas[i + 1]), float(sigmas[i]),
                               remaskable=ctx.free, **ctx.draw)
            if ctx.calls.requests == requests:
                ctx.info.lazy_skips += 1
            z = ctx.advance(z_new, i + 1)
        ctx.info.extras["remdm_sigma"] = sigmas.tolist()
        ctx.fill_leftover(times[-1])
