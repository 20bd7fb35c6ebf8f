"""Denoisers with known answers for testing the objectives and samplers.

``ExactConditionals`` holds a joint distribution p over all V^L sequences (tiny V and L) and
returns, for every masked position, the exact conditional p(x^i | unmasked tokens) as logits.
With it, docs/math.md's any-order-autoregressive identity says L_∞(x) = -log p(x).
"""

from __future__ import annotations

import itertools
import math

import torch


class ExactConditionals:
    """Time-agnostic denoiser returning the exact conditionals of a joint p (V^L table)."""

    time_conditioning = False

    def __init__(self, vocab_size: int, length: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.length = length
        self.configs = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))  # (N, L)
        # A Dirichlet(1, ..., 1) draw: normalised Exp(1) variables, from the seeded generator.
        u = torch.rand(len(self.configs), generator=g, dtype=torch.float64).clamp_min(1e-12)
        raw = -torch.log(u)
        self.p = raw / raw.sum()  # (N,)
        self.calls = 0

    def log_p(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for x of shape (B, L)."""
        idx = (x.long() * (self.vocab_size ** torch.arange(self.length - 1, -1, -1))).sum(-1)
        return torch.log(self.p[idx])

    def conditionals(self, z: torch.Tensor) -> torch.Tensor:
        """p(x^i = j | unmasked part of z) for every position, (B, L, V) float64."""
        mask_id = self.vocab_size
        consistent = ((self.configs[None] == z[:, None]) | (z[:, None] == mask_id)).all(-1)  # (B, N)
        weights = consistent.double() * self.p[None]  # (B, N)
        onehot = torch.nn.functional.one_hot(self.configs, self.vocab_size).double()  # (N, L, V)
        probs = torch.einsum("bn,nlv->blv", weights, onehot)
        return probs / probs.sum(-1, keepdim=True)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.log(self.conditionals(z)).float()


def mask_patterns(length: int) -> torch.Tensor:
    """All 2^L boolean mask patterns, (2^L, L)."""
    return torch.tensor(list(itertools.product([False, True], repeat=length)))


def masked_ce_per_pattern(denoiser: ExactConditionals, x: torch.Tensor) -> torch.Tensor:
    """Σ_{i ∈ M} -log μ(z_M)_{i, x^i} for every mask pattern M of one sequence x (L,), (2^L,)."""
    patterns = mask_patterns(x.numel())
    z = torch.where(patterns, torch.full_like(x, denoiser.vocab_size)[None], x[None])
    logp = torch.log(denoiser.conditionals(z))  # (P, L, V)
    ce = -logp.gather(-1, x.expand(len(patterns), -1)[..., None]).squeeze(-1)
    return (ce * patterns).sum(-1).double()


def any_order_ar_value(denoiser: ExactConditionals, x: torch.Tensor) -> float:
    """Σ_M (|M|-1)!(L-|M|)!/L! · Σ_{i∈M} -log μ(z_M)_{i,x^i} for one sequence x (L,)."""
    L = x.numel()
    patterns = mask_patterns(L)
    ce = masked_ce_per_pattern(denoiser, x)
    k = patterns.sum(-1)
    total = 0.0
    for kk, c in zip(k.tolist(), ce.tolist()):
        if kk == 0:
            continue
        total += math.factorial(kk - 1) * math.factorial(L - kk) / math.factorial(L) * c
    return total


def pattern_probabilities(mask_prob: torch.Tensor) -> torch.Tensor:
    """Probability of every mask pattern when position i is masked with prob mask_prob[..., i].

    mask_prob: (..., L) -> (..., 2^L), patterns ordered as :func:`mask_patterns`.
    """
    L = mask_prob.shape[-1]
    patterns = mask_patterns(L).to(mask_prob.dtype)  # (P, L)
    m = mask_prob[..., None, :]
    return torch.prod(patterns * m + (1 - patterns) * (1 - m), dim=-1)
