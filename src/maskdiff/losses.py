"""MD4, GenMD4 and autoregressive objectives: the only loss (docs/math.md, "MD4 training objective",
"GenMD4" and "Autoregressive baseline").

All values are **nats per sequence**, shape (B,). Conversion to bits per token or perplexity
happens only where results are reported (:mod:`maskdiff.metrics`).

A *denoiser* is any callable ``denoiser(z_t, t) -> logits`` with ``z_t`` a LongTensor (B, L)
holding the mask id ``V`` at masked positions, ``t`` a float tensor (B,), and logits (B, L, V).
Only the masked positions' cross-entropies enter the loss; they are computed by selecting those
positions and gathering the target log-probability, never through a one-hot of size (B, L, V).

Terms reported by every objective (nats per sequence):

* ``diffusion``       the weighted integral of masked cross-entropies (one Monte Carlo draw);
* ``reconstruction``  ``-log p(x | z_0)`` bound: ``L · (1 - α(0)) · log V`` for MD4 (tokens still
                      masked at t = 0 are predicted uniformly); GenMD4's closed form at t1;
* ``prior``           ``KL(q(z_1 | x) || p(z_1))`` with the prior that puts mass α(1) uniformly on
                      the V tokens and 1 - α(1) on the mask: exactly ``L · α(1) · log V``. (The
                      reference code takes this term as 0; with α(1) = ε = 1e-4 it is 1e-4 · log V
                      nats per token, but it keeps the bound valid, so it is reported.)
* ``nelbo``           their sum: the negative ELBO, an upper bound on -log p(x).

**Score masks.** Every objective takes ``score_mask`` (bool, x's shape; None: every position):
the positions whose loss counts. The whole of x is still the input and goes through the masking
process, with the same random draws as without a mask; only the cross-entropy, reconstruction and
prior sums are restricted to the scored positions. The result is the NELBO of the model in which
the unscored positions are known, a valid bound on ``-log p(scored tokens | the rest)``
(docs/math.md, "Token-weighted averages: the ratio estimator"). An all-True mask gives exactly the
unmasked values, and the terms of complementary masks add up to the whole.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from maskdiff.forward import Denoiser, discretize_time, forward_sample, rescale_time, sample_times
from maskdiff.schedules import GenMD4Schedule, Schedule

__all__ = [
    "Denoiser",
    "masked_cross_entropy",
    "md4_loss_terms",
    "md4_nelbo",
    "genmd4_losses",
    "ar_nll_terms",
    "genmd4_diffusion_integrand",
    "genmd4_position_terms",
    "genmd4_reconstruction",
    "genmd4_log_mask_probability",
]

#: ``(z_t, t, x, masked) -> (B, *S)`` float32 cross-entropy at masked positions, 0 elsewhere.
MaskedCrossEntropy = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

#: ``(z_t, t, x, masked, w) -> (B, *S)`` float32 GenMD4 terms ``w_x (-log μ_x - 1) + Σ_j w_j μ_j``
#: at masked positions, 0 elsewhere (w: the exponents (V,)); see :func:`genmd4_losses`.
MaskedIntegrand = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

#: GenMD4's lower time limit t1: the diffusion integral runs over [t1, 1].
GENMD4_T1 = 1e-3


def _vocab_size(logits: Tensor) -> int:
    return logits.shape[-1]


def _check_inputs(x: Tensor) -> None:
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"x must hold integer token ids, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, L, ...), got {tuple(x.shape)}")


def _check_score_mask(score_mask: Tensor | None, x: Tensor) -> Tensor | None:
    """``score_mask`` as a bool tensor on x's device (None stays None); its shape must be x's."""
    if score_mask is None:
        return None
    if tuple(score_mask.shape) != tuple(x.shape):
        raise ValueError(f"score_mask has shape {tuple(score_mask.shape)}, x has {tuple(x.shape)}; they must match")
    return score_mask.to(device=x.device, dtype=torch.bool)


def _scored_sum(values: Tensor, score: Tensor | None) -> Tensor:
    """Per-sequence sum of per-position ``values`` (B, *S) over the scored positions, shape (B,)."""
    if score is not None:
        values = values * score
    return values.flatten(1).sum(1)


def _call_denoiser(denoiser: Denoiser, z: Tensor, t: Tensor, vocab_size: int | None) -> Tensor:
    logits = denoiser(z, t)
    if logits.shape[:-1] != z.shape:
        raise ValueError(
            f"denoiser returned logits of shape {tuple(logits.shape)} for z of shape "
            f"{tuple(z.shape)}; expected {tuple(z.shape)} + (V,)"
        )
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise ValueError(f"denoiser returned {logits.shape[-1]} logits per position, schedule expects V={vocab_size}")
    return logits


def _infer_vocab_size(denoiser: Denoiser, x: Tensor, schedule: Schedule, vocab_size: int | None) -> int:
    """V (= the mask id) from the argument, the schedule, the denoiser's ``vocab_size``, or a probe.

    A plain function carries no attribute: it is then called once on the first clean sequence
    (no masks, t = 0) only to read the width of its output.
    """
    for candidate in (vocab_size, getattr(schedule, "vocab_size", None), getattr(denoiser, "vocab_size", None)):
        if candidate is not None:
            v = int(candidate)
            break
    else:
        with torch.no_grad():
            probe = denoiser(x[:1], torch.zeros(1, device=x.device))
        v = int(probe.shape[-1])
    if x.numel() and int(x.max()) >= v:
        raise ValueError(
            f"x holds token id {int(x.max())} but the vocabulary has V={v} entries (ids 0..{v - 1}; "
            f"{v} is the mask id): check the data's vocabulary against the model's"
        )
    if x.numel() and int(x.min()) < 0:
        raise ValueError(f"x holds a negative token id {int(x.min())}")
    return v


def masked_cross_entropy(logits: Tensor, x: Tensor, masked: Tensor) -> Tensor:
    """Per-position cross-entropy ``-log softmax(logits)[x]`` at masked positions, 0 elsewhere.

    Args:
        logits: (B, *S, V) in any float dtype (cast to float32 at the selected positions only).
        x: clean tokens (B, *S).
        masked: bool (B, *S).
    Returns:
        float32 tensor (B, *S).
    """
    ce = torch.zeros(x.shape, dtype=torch.float32, device=logits.device)
    if masked.any():
        sel_logits = logits[masked].float()  # (N, V): masked positions only
        values = F.cross_entropy(sel_logits, x[masked].long(), reduction="none")  # (N,)
        ce = ce.masked_scatter(masked, values)
    return ce


def _refuse_per_token(schedule: Schedule) -> None:
    """MD4's integrand w(t) · Σ CE is the ELBO only for a schedule shared by every token."""
    if getattr(schedule, "per_token", False):
        raise ValueError(
            f"md4_loss_terms / md4_nelbo need a scalar schedule, got the per-token {type(schedule).__name__}: "
            "with a per-token schedule MD4's integrand is not a bound (docs/math.md, \"GenMD4\"); "
            "use maskdiff.genmd4_losses(denoiser, x, schedule) instead"
        )


def _md4_boundary_terms(
    schedule: Schedule, x: Tensor, vocab_size: int, score: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reconstruction ``L (1 - α(0)) log V`` and prior ``L α(1) log V`` per sequence, shape (B,),
    summed over the scored positions (docs/math.md, "Reconstruction and prior terms")."""
    batch = x.shape[0]
    dev = x.device
    zeros = torch.zeros(batch, dtype=torch.float64, device=dev)
    ones = torch.ones(batch, dtype=torch.float64, device=dev)
    log_v = math.log(vocab_size)
    alpha0 = schedule.alpha(zeros, x).detach()  # (B, *S)
    alpha1 = schedule.alpha(ones, x).detach()
    reconstruction = _scored_sum((1.0 - alpha0) * log_v, score)
    prior = _scored_sum(alpha1 * log_v, score)
    return reconstruction.float(), prior.float()


def md4_loss_terms(
    denoiser: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
    vocab_size: int | None = None,
    cross_entropy: MaskedCrossEntropy | None = None,
    score_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """MD4 negative ELBO terms, one Monte Carlo draw per sequence (nats per sequence, (B,)).

    Continuous time (``num_steps=None``), with t ~ U[0, 1) (antithetic across the batch)::

        diffusion = w(t) · Σ_{i: z_t^i = m} -log μ_θ(z_t, t)_{i, x^i},   w(t) = -α'(t) / (1 - α(t))

    an unbiased estimate of ``∫_0^1 w(t) E_q[Σ_masked CE] dt``.

    Discrete time with T = ``num_steps``: draw i uniformly from {1..T}, t = i/T, s = (i-1)/T::

        diffusion = T · (α_s - α_t) / (1 - α_t) · Σ_{masked} -log μ_θ(z_t, t)_{i, x^i}

    Scalar schedules only: a per-token schedule raises ValueError (its bound is
    :func:`genmd4_losses`). Returns a dict with ``diffusion``, ``reconstruction``, ``prior``,
    ``nelbo`` (their sum), and ``t`` (the times drawn) and ``num_masked`` (masked positions that
    count) for logging.
    ``vocab_size`` defaults to the denoiser's output width. ``score_mask`` (bool, x's shape)
    restricts the three sums to the scored positions (see the module docs).

    ``cross_entropy(z, t, x, masked) -> (B, *S)`` replaces "call the denoiser, then
    :func:`masked_cross_entropy`" when given: :class:`maskdiff.model.MaskedDiffusion` passes one
    that applies the output head to the masked positions only, in chunks
    (:mod:`maskdiff.cross_entropy`). It must return the same values.
    """
    _refuse_per_token(schedule)
    _check_inputs(x)
    score = _check_score_mask(score_mask, x)
    batch = x.shape[0]
    u = sample_times(batch, antithetic=antithetic, generator=generator, device=x.device, dtype=torch.float64)
    if num_steps is None:
        t = u
    else:
        t, s = discretize_time(u, num_steps)

    v_known = _infer_vocab_size(denoiser, x, schedule, vocab_size)
    z = forward_sample(x, t, schedule, mask_id=v_known, generator=generator)  # over every position
    masked = z == v_known
    if score is not None:
        masked = masked & score  # the masked positions whose cross-entropy counts
    if cross_entropy is None:
        logits = _call_denoiser(denoiser, z, t.float(), v_known)
        ce = masked_cross_entropy(logits, x, masked)  # (B, *S)
    else:
        ce = cross_entropy(z, t.float(), x, masked)  # (B, *S)

    if num_steps is None:
        weight = schedule.weight(t, x)  # (B, *S), float64 for scalar schedules
    else:
        alpha_t = schedule.alpha(t, x)
        alpha_s = schedule.alpha(s, x)
        weight = num_steps * (alpha_s - alpha_t) / (1.0 - alpha_t)
    diffusion = (weight.to(ce.dtype) * ce).flatten(1).sum(1)
    reconstruction, prior = _md4_boundary_terms(schedule, x, v_known, score)
    return {
        "diffusion": diffusion,
        "reconstruction": reconstruction,
        "prior": prior,
        "nelbo": diffusion + reconstruction + prior,
        "t": t.float(),
        "num_masked": masked.flatten(1).sum(1),
    }


def md4_nelbo(
    denoiser: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    score_mask: Tensor | None = None,
) -> Tensor:
    """One Monte Carlo estimate per sequence of the MD4 negative ELBO in nats, shape (B,).

    Includes the reconstruction and prior terms (see :func:`md4_loss_terms`).
    ``num_steps=None`` gives the continuous-time bound L_∞, an integer T the discrete-time L_T.
    ``score_mask`` sums over the scored positions only (see the module docs).
    """
    return md4_loss_terms(
        denoiser, x, schedule, num_steps=num_steps, generator=generator, vocab_size=vocab_size,
        score_mask=score_mask,
    )["nelbo"]


# ----------------------------------------------------------------------------------------------
# GenMD4

#: The largest float32 below 1. GenMD4's times are float32: u close to 1 would otherwise round to
#: t = 1, where with ε = 0 a visible token has log q = -inf (docs/math.md, "GenMD4", "Numerics").
_BELOW_ONE_F32 = 1.0 - 2.0**-24


def genmd4_position_terms(log_mu: Tensor, target: Tensor, w: Tensor) -> Tensor:
    """GenMD4's integrand per masked position, without its 1/t: ``w_x (-log μ_x - 1) + Σ_j w_j μ_j``.

    Args:
        log_mu: (N, V) float32 log-probabilities of the masked positions; target: (N,) their clean
            tokens; w: (V,) the exponents.
    Returns:
        (N,) float32. ``Σ_j w_j μ_j`` is a float32 product even under autocast: it nearly cancels
        against ``w_x`` (exactly, for equal exponents), and in bf16 it would carry ~1e-3 relative
        error into every position.
    """
    log_mu_x = log_mu.gather(-1, target[:, None]).squeeze(-1)  # (N,)
    with torch.autocast(log_mu.device.type, enabled=False):
        expected_w = log_mu.float().exp() @ w.float()  # Σ_j μ_j w_j, (N,)
    return w[target] * (-log_mu_x - 1.0) + expected_w


def _masked_time_sum(values: Tensor, masked: Tensor, t: Tensor) -> Tensor:
    """Σ over each sequence's masked positions of ``values / t``: values (N,) in the order of
    ``masked.nonzero()``, masked (B, *S), t (B,); returns (B,) float32."""
    rows = masked.nonzero(as_tuple=True)[0]  # batch index of each masked position, (N,)
    out = torch.zeros(masked.shape[0], dtype=torch.float32, device=values.device)
    return out.index_add(0, rows, (1.0 / t.float()[rows]) * values)


def genmd4_diffusion_integrand(
    logits: Tensor, x: Tensor, masked: Tensor, t: Tensor, schedule: GenMD4Schedule
) -> Tensor:
    """GenMD4's continuous-time integrand at time t, summed over masked positions, shape (B,).

    Per masked position with clean token x (docs/math.md, "GenMD4")::

        ℓ_i(t) = (w_x / t) · (-log μ_x - 1) + Σ_j (w_j / t) · μ_j

    With every w_j = k this is (k/t)·(-log μ_x): MD4's polynomial-schedule integrand.
    See :func:`genmd4_position_terms` for the precision of the last sum.

    Args:
        logits: (B, L, V); x: (B, L); masked: bool (B, L); t: (B,).
    """
    if not masked.any():
        zero = torch.zeros(x.shape[0], dtype=torch.float32, device=logits.device)
        return zero + 0.0 * schedule.phi.sum()  # keep φ in the graph
    log_mu = F.log_softmax(logits[masked].float(), dim=-1)  # (N, V)
    values = genmd4_position_terms(log_mu, x[masked].long(), schedule.exponents.float())
    return _masked_time_sum(values, masked, t)


def _genmd4_reconstruction_per_position(x: Tensor, schedule: GenMD4Schedule, t1: float) -> Tensor:
    """The summand of :func:`genmd4_reconstruction`, shape (B, *S)."""
    w = schedule.exponents.float()  # (V,)
    log_t1 = math.log(t1)
    log_norm = torch.logsumexp(w * log_t1, dim=0)
    wx = w[x.long()]  # (B, L)
    return -(1.0 - schedule.eps) * torch.exp(wx * log_t1) * (wx * log_t1 - log_norm)


def genmd4_reconstruction(x: Tensor, schedule: GenMD4Schedule, t1: float = GENMD4_T1) -> Tensor:
    """Reconstruction term at t1 per sequence, shape (B,) (the reference code's closed form)::

        Σ_i -(1 - ε) · t1^{w_x} · (w_x log t1 - logsumexp_j(w_j log t1))

    i.e. P(masked at t1) times -log of the probability that a mask at t1 hides x.
    """
    return _genmd4_reconstruction_per_position(x, schedule, t1).flatten(1).sum(1)


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - e^a) for a < 0, accurate everywhere: log(-expm1 a) for a > -ln 2, log1p(-e^a) below.

    Each branch sees only arguments where it is finite, so neither can put NaN into the gradient.
    """
    near = a > -math.log(2.0)
    cut = torch.full_like(a, -math.log(2.0))
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, a, cut))),
                       torch.log1p(-torch.exp(torch.where(near, cut, a))))


def genmd4_log_mask_probability(z: Tensor, x: Tensor, t: Tensor, schedule: GenMD4Schedule) -> Tensor:
    """log q(z | x, t) per sequence, shape (B,)::

        Σ_i [ masked: log(1 - ε) + w_{x^i} log t ;  unmasked: log(1 - (1 - ε) t^{w_{x^i}}) ]

    The unmasked term is evaluated stably (log(-expm1(·)) near t = 1) and only at unmasked
    positions: at a masked position with ε = 0 and t = 1 it would be log 0, whose gradient would
    turn the exponents' gradient into NaN even though the term is not selected.
    """
    masked = z == schedule.vocab_size
    log_masked = schedule.log_alpha_complement(t, x)  # (B, L)
    log_kept = _log1mexp(torch.where(masked, torch.full_like(log_masked, -1.0), log_masked))
    return torch.where(masked, log_masked, log_kept).flatten(1).sum(1)


def genmd4_losses(
    denoiser: Denoiser,
    x: Tensor,
    schedule: GenMD4Schedule,
    *,
    generator: torch.Generator | None = None,
    t1: float = GENMD4_T1,
    antithetic: bool = True,
    score_mask: Tensor | None = None,
    integrand: MaskedIntegrand | None = None,
) -> dict[str, Tensor]:
    """GenMD4 objective with the REINFORCE leave-one-out (RLOO) gradient, per sequence (B,).

    t ~ U[t1, 1) (antithetic, rescaled; in float32, kept below 1); two independent masks z¹, z²
    at the same t per sequence (one denoiser call on a batch of 2B). With
    ℓᵏ = (1 - t1) · Σ_{masked i} ℓ_i(t) (an unbiased estimate of ∫_{t1}^1 E_q[Σ ℓ_i] dt)::

        nelbo     = ½ (ℓ¹ + ℓ²) + reconstruction + prior
        surrogate = nelbo + ½ · stopgrad(ℓ¹ - ℓ²) · (log q(z¹) - log q(z²))

    Backpropagate ``surrogate`` (its gradient in φ is unbiased); report ``nelbo``.
    Returns ``surrogate``, ``nelbo``, ``diffusion`` (= ½(ℓ¹ + ℓ²)), ``reconstruction``, ``prior``,
    ``t`` and ``num_masked`` (mean of the two draws).

    ``score_mask`` (bool, x's shape) restricts ℓ, the reconstruction and the prior to the scored
    positions; log q(z) stays over every position, since every position is masked at random.

    ``integrand(z, t, x, masked, w) -> (B, *S)`` replaces "call the denoiser, then
    :func:`genmd4_position_terms` on the masked positions" when given (0 at the other positions,
    w the exponents (V,) to differentiate through): :class:`maskdiff.model.MaskedDiffusion`
    passes one that applies the output head to the masked positions only, in chunks
    (:func:`maskdiff.cross_entropy.linear_genmd4_terms`). It must return the same values.
    """
    if not isinstance(schedule, GenMD4Schedule):
        raise TypeError(
            f"genmd4_losses needs the per-token GenMD4 schedule (get_schedule('genmd4', ...)), "
            f"got {type(schedule).__name__}; use md4_nelbo for scalar schedules"
        )
    _check_inputs(x)
    score = _check_score_mask(score_mask, x)
    vocab = schedule.vocab_size
    batch = x.shape[0]
    u = sample_times(batch, antithetic=antithetic, generator=generator, device=x.device, dtype=torch.float64)
    t = rescale_time(u, t1).float().clamp(max=_BELOW_ONE_F32)  # (B,), in [t1, 1) after float32 rounding

    x2 = torch.cat([x, x], dim=0)  # (2B, L)
    t2 = torch.cat([t, t], dim=0)  # (2B,)
    with torch.no_grad():
        z2 = forward_sample(x2, t2, schedule, mask_id=vocab, generator=generator)
    masked = z2 == vocab
    if score is not None:
        masked = masked & torch.cat([score, score], dim=0)  # the masked positions that count
    if integrand is None:
        logits = _call_denoiser(denoiser, z2, t2, vocab)
        ell = genmd4_diffusion_integrand(logits, x2, masked, t2, schedule)  # (2B,)
    else:
        per_position = integrand(z2, t2, x2, masked, schedule.exponents)  # (2B, *S)
        ell = _masked_time_sum(per_position[masked], masked, t2) + 0.0 * per_position.sum()  # (graph kept if none)
    ell = (1.0 - t1) * ell
    ell1, ell2 = ell[:batch], ell[batch:]

    log_q = genmd4_log_mask_probability(z2, x2, t2, schedule)  # (2B,)
    rloo = 0.5 * (ell1 - ell2).detach() * (log_q[:batch] - log_q[batch:])

    diffusion = 0.5 * (ell1 + ell2)
    reconstruction = _scored_sum(_genmd4_reconstruction_per_position(x, schedule, t1), score)
    prior = _scored_sum(torch.full(x.shape, schedule.eps * math.log(vocab), device=x.device), score)
    nelbo = diffusion + reconstruction + prior
    return {
        "surrogate": nelbo + rloo,
        "nelbo": nelbo,
        "diffusion": diffusion,
        "reconstruction": reconstruction,
        "prior": prior,
        "t": t,
        "num_masked": 0.5 * masked.flatten(1).sum(1).float().view(2, batch).sum(0),
    }


# ----------------------------------------------------------------------------------------------
# Autoregressive baseline


def ar_nll_terms(
    network: Callable[..., Tensor],
    x: Tensor,
    *,
    score_mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> dict[str, Tensor]:
    """Exact next-token negative log-likelihood per sequence, nats, shape (B,)
    (docs/math.md, "Autoregressive baseline").

    The input is x (B, L) shifted right by one with the mask id V as beginning-of-sequence token;
    ``network(inputs, None)`` (a causal network, no time input) returns logits (B, L, V) whose
    position i predicts ``x^i``. ``score_mask`` sums over the scored positions only. Returned as
    ``diffusion`` = ``nelbo`` with zero ``reconstruction`` and ``prior``, so the evaluation of the
    diffusion objectives applies unchanged. ``vocab_size`` defaults to ``network.vocab_size``.
    """
    _check_inputs(x)
    score = _check_score_mask(score_mask, x)
    vocab = vocab_size if vocab_size is not None else _network_vocab_size(network)
    bos = torch.full_like(x[:, :1], vocab)
    inputs = torch.cat([bos, x[:, :-1]], dim=1)  # (B, L)
    logits = network(inputs, None).float()  # (B, L, V)
    nll = F.cross_entropy(logits.flatten(0, 1), x.flatten().long(), reduction="none").view(x.shape)
    nll = _scored_sum(nll, score)
    zero = torch.zeros_like(nll)
    return {"diffusion": nll, "reconstruction": zero, "prior": zero, "nelbo": nll}


def _network_vocab_size(network: Any) -> int:
    v = getattr(network, "vocab_size", None)
    if v is None:
        raise ValueError("pass vocab_size: the network has no vocab_size attribute (the BOS id is V)")
    return int(v)
