"""The forward (masking) process and the time distributions used for training.

Each token is masked independently: ``q(z_t^i = x^i) = α_t`` and ``q(z_t^i = m) = 1 - α_t``
with mask id ``m = V`` (docs/math.md, "Forward process"). For a per-token schedule (GenMD4)
α_t depends on the clean token ``x^i``.

Every random function takes an optional ``torch.Generator``; nothing here seeds globally.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from maskdiff.schedules import Schedule

__all__ = [
    "Denoiser",
    "uniform",
    "sample_times",
    "rescale_time",
    "discrete_time_grid",
    "discretize_time",
    "mask_tokens",
    "forward_sample",
]


class Denoiser(Protocol):
    """The network as the losses and the sampler call it: ``denoiser(z, t) -> logits``.

    ``z`` LongTensor (B, L) (or (B, *S)) with the mask id V at masked positions, ``t`` float
    tensor (B,), logits (B, L, V) (or (B, *S, V)): μ = softmax(logits) predicts the clean token at
    every position. Optionally a ``time_conditioning`` attribute: ``False`` declares an output
    that ignores t, which lets the sampler reuse outputs across steps.
    """

    def __call__(self, z: Tensor, t: Tensor) -> Tensor: ...


def uniform(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """U[0, 1) samples of ``shape`` drawn with ``generator`` (on the generator's device)."""
    if generator is not None:
        out = torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
        return out.to(device) if device is not None else out
    return torch.rand(shape, device=device, dtype=dtype)


def sample_times(
    batch_size: int,
    *,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """One time in [0, 1) per sequence, shape (B,).

    With ``antithetic=True`` (stratified): ``t_b = (u + b/B) mod 1`` for a single uniform u,
    so every t_b is marginally U[0, 1) while the batch covers [0, 1) evenly.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if antithetic:
        u = uniform((1,), generator=generator, device=device, dtype=torch.float64)
        offsets = torch.arange(batch_size, device=u.device, dtype=torch.float64) / batch_size
        t = torch.remainder(u + offsets, 1.0)
    else:
        t = uniform((batch_size,), generator=generator, device=device, dtype=torch.float64)
    return t.to(dtype)


def rescale_time(t: Tensor, t_min: float) -> Tensor:
    """Map t ∈ [0, 1) to ``t_min + (1 - t_min) t`` ∈ [t_min, 1) (GenMD4 uses t_min = t1 = 1e-3)."""
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must lie in [0, 1), got {t_min}")
    return t_min + (1.0 - t_min) * t


def discrete_time_grid(num_steps: int, *, device: torch.device | str | None = None) -> Tensor:
    """Grid t(i) = i/T for i = 0..T, shape (T+1,), float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    return torch.arange(num_steps + 1, device=device, dtype=torch.float64) / num_steps


def discretize_time(u: Tensor, num_steps: int) -> tuple[Tensor, Tensor]:
    """Map u ∈ [0, 1) to a step i ∈ {1..T} uniformly and return ``(t, s) = (i/T, (i-1)/T)``.

    ``u`` of shape (B,) (e.g. from :func:`sample_times`), outputs of shape (B,) in u's dtype.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    i = torch.clamp(torch.floor(u.double() * num_steps), 0, num_steps - 1) + 1
    return (i / num_steps).to(u.dtype), ((i - 1) / num_steps).to(u.dtype)


def mask_tokens(
    x: Tensor,
    alpha: Tensor,
    mask_id: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Keep each token with probability ``alpha`` (same shape as x), else replace it by ``mask_id``.

    Args:
        x: clean tokens, LongTensor (B, *S).
        alpha: keep probabilities, broadcastable to x.
    Returns:
        z: LongTensor (B, *S) with ``mask_id`` at masked positions.
    """
    u = uniform(tuple(x.shape), generator=generator, device=x.device, dtype=torch.float64)
    keep = u < alpha.detach().to(torch.float64)
    return torch.where(keep, x, torch.full_like(x, mask_id))


def forward_sample(
    x: Tensor,
    t: Tensor,
    schedule: Schedule,
    *,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``z_t ~ q(z_t | x)`` for clean tokens x (B, *S) at times t (B,); works for every schedule."""
    alpha = schedule.alpha(t, x)
    return mask_tokens(x, alpha, mask_id, generator=generator)
