"""Cross-entropy through the output head, chunked over positions (the memory-lean loss path).

``linear_cross_entropy(h, W, y)`` returns ``-log softmax(h Wᵀ)[y]`` row by row, exactly what
``F.cross_entropy(h @ W.T, y, reduction="none")`` gives, but it never holds the float32 logits of
all N rows at once: the rows are processed in chunks of ``chunk_size``, only a (N,) log-normaliser
is kept for the backward pass, and the backward recomputes each chunk's logits.

Why it matters (docs/math.md, "MD4 training objective"): only masked positions enter the loss, so
the trainer passes the final hidden states of the masked positions only (about half of B·L on
average), and at GPT-2 scale (V = 50,257) the full float32 logits of a 32 × 1024 batch would be
6.6 GB, plus as much again for their softmax and gradient. Here the peak extra memory is
``chunk_size × V`` floats (~128 MB by default) whatever the batch.

Cost: one extra head matmul per chunk in the backward pass (the logits are recomputed), i.e. the
head's FLOPs go from 3 to 4 matmuls, ~4% of an MD4-S training step.

Under autocast the matmuls run in the autocast dtype (bf16 on CUDA), and the log-softmax, the
gradient of the logits and the accumulation of the head's gradient in float32.

``linear_genmd4_terms(h, W, y, w)`` is the same for GenMD4's integrand (docs/math.md, "GenMD4"):
per row ``w_y (-log μ_y - 1) + Σ_j w_j μ_j`` with μ = softmax(h Wᵀ), with gradients to h, W and
the exponents w. It keeps two (N,) floats per row (the log-normaliser and Σ_j w_j μ_j) and
recomputes each chunk's logits in the backward pass. ``Σ_j w_j μ_j`` and every other step after
the head's matmul are float32, under autocast too.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_cross_entropy", "linear_genmd4_terms", "default_chunk_size"]

#: Target number of float32 logits per chunk (2**25 floats = 128 MiB).
_CHUNK_ELEMENTS = 2**25


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's float32 logits take about 128 MiB (at least 64 rows)."""
    return max(64, _CHUNK_ELEMENTS // max(1, vocab_size))


def _compute_dtype(h: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd function for :func:`linear_cross_entropy` (see the module docstring)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, target: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        n = h.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        target_logit = torch.empty(n, dtype=torch.float32, device=h.device)
        w = weight.to(dtype)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                logits = (h[start:stop].to(dtype) @ w.T).float()  # (c, V)
                lse[start:stop] = torch.logsumexp(logits, dim=-1)
                target_logit[start:stop] = logits.gather(1, target[start:stop, None]).squeeze(1)
        ctx.save_for_backward(h, weight, target, lse)
        ctx.chunk_size = chunk_size
        ctx.dtype = dtype
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        h, weight, target, lse = ctx.saved_tensors
        chunk_size, dtype = ctx.chunk_size, ctx.dtype
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(dtype)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                h_chunk = h[start:stop].to(dtype)
                logits = (h_chunk @ w.T).float()  # (c, V), recomputed
                # d(lse - logit_y)/d logits = softmax - onehot(y), scaled by the incoming gradient.
                grad_logits = torch.exp(logits - lse[start:stop, None])
                rows = torch.arange(stop - start, device=h.device)
                grad_logits[rows, target[start:stop]] -= 1.0
                grad_logits *= grad_out[start:stop, None].float()
                if need_h:
                    grad_h[start:stop] = (grad_logits.to(dtype) @ w).to(h.dtype)  # type: ignore[index]
                if need_w:
                    grad_w += (grad_logits.T.to(dtype) @ h_chunk).float()  # type: ignore[operator]
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None  # type: ignore[union-attr]


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Per-row cross-entropy of the logits ``h @ weight.T`` against ``target``, chunked.

    Args:
        h: (N, D) hidden states (any float dtype).
        weight: (V, D) output head (``nn.Linear(D, V, bias=False).weight``).
        target: (N,) int64 class ids in [0, V).
        chunk_size: rows per chunk (default: :func:`default_chunk_size`).

    Returns:
        (N,) float32 ``logsumexp_j (h W^T)_j - (h W^T)_y`` with gradients to ``h`` and ``weight``.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"expected h (N, D) and weight (V, D), got {tuple(h.shape)} and {tuple(weight.shape)}")
    if target.shape != h.shape[:1]:
        raise ValueError(f"target must have shape ({h.shape[0]},), got {tuple(target.shape)}")
    size = default_chunk_size(weight.shape[0]) if chunk_size is None else int(chunk_size)
    if size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _LinearCrossEntropy.apply(h, weight, target.long(), size, _compute_dtype(h))


class _LinearGenMD4Terms(torch.autograd.Function):
    """Autograd function for :func:`linear_genmd4_terms`.

    Per row, with logits ℓ = h Wᵀ, μ = softmax(ℓ), ce = lse(ℓ) - ℓ_y and E = Σ_j w_j μ_j:
    f = w_y (ce - 1) + E, so ∂f/∂ℓ = w_y (μ - e_y) + μ ⊙ (w - E) and ∂f/∂w = e_y (ce - 1) + μ.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, target: Tensor, w: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        n = h.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        ce = torch.empty(n, dtype=torch.float32, device=h.device)
        expected_w = torch.empty(n, dtype=torch.float32, device=h.device)
        w32 = w.float()
        head = weight.to(dtype)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                logits = (h[start:stop].to(dtype) @ head.T).float()  # (c, V)
                lse[start:stop] = torch.logsumexp(logits, dim=-1)
                ce[start:stop] = lse[start:stop] - logits.gather(1, target[start:stop, None]).squeeze(1)
                expected_w[start:stop] = logits.sub_(lse[start:stop, None]).exp_() @ w32  # μ in place
                del logits  # before the next chunk's logits exist
        ctx.save_for_backward(h, weight, target, w, lse, ce, expected_w)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return w32[target] * (ce - 1.0) + expected_w

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        h, weight, target, w, lse, ce, expected_w = ctx.saved_tensors
        chunk_size, dtype = ctx.chunk_size, ctx.dtype
        need_h, need_weight, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        g = grad_out.float()
        w32 = w.float()
        grad_h = torch.empty_like(h) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        head = weight.to(dtype)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_size):
                stop = min(start + chunk_size, h.shape[0])
                h_chunk, y, gc = h[start:stop].to(dtype), target[start:stop], g[start:stop, None]
                mu = (h_chunk @ head.T).float().sub_(lse[start:stop, None]).exp_()  # (c, V), recomputed
                if need_w:
                    grad_w += mu.T @ gc[:, 0]
                # ∂f/∂ℓ = μ ⊙ (w + w_y - E) - w_y e_y, times the incoming gradient
                w_y = w32[y]
                grad_logits = mu.mul_(w32[None, :] + (w_y - expected_w[start:stop])[:, None])
                grad_logits[torch.arange(stop - start, device=h.device), y] -= w_y
                grad_logits *= gc
                if need_h:
                    grad_h[start:stop] = (grad_logits.to(dtype) @ head).to(h.dtype)  # type: ignore[index]
                if need_weight:
                    grad_weight += (grad_logits.T.to(dtype) @ h_chunk).float()  # type: ignore[operator]
                del mu, grad_logits  # before the next chunk's μ exists
        if need_w:
            grad_w.index_add_(0, target, g * (ce - 1.0))  # type: ignore[union-attr]
        return (grad_h, grad_weight.to(weight.dtype) if need_weight else None, None,  # type: ignore[union-attr]
                grad_w.to(w.dtype) if need_w else None, None, None)  # type: ignore[union-attr]


def linear_genmd4_terms(
    h: Tensor, weight: Tensor, target: Tensor, exponents: Tensor, *, chunk_size: int | None = None
) -> Tensor:
    """GenMD4's per-position terms ``w_y (-log μ_y - 1) + Σ_j w_j μ_j`` with μ = softmax(h Wᵀ), chunked.

    The same values as :func:`maskdiff.losses.genmd4_position_terms` on ``log_softmax(h @ W.T)``,
    without the (N, V) logits (see the module docstring).

    Args:
        h: (N, D) hidden states; weight: (V, D) output head; target: (N,) int64 class ids;
        exponents: (V,) GenMD4's w = softplus(φ) (differentiable); chunk_size: rows per chunk.

    Returns:
        (N,) float32, with gradients to ``h``, ``weight`` and ``exponents``.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"expected h (N, D) and weight (V, D), got {tuple(h.shape)} and {tuple(weight.shape)}")
    if target.shape != h.shape[:1]:
        raise ValueError(f"target must have shape ({h.shape[0]},), got {tuple(target.shape)}")
    if exponents.shape != weight.shape[:1]:
        raise ValueError(f"exponents must have shape ({weight.shape[0]},), got {tuple(exponents.shape)}")
    size = default_chunk_size(weight.shape[0]) if chunk_size is None else int(chunk_size)
    if size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _LinearGenMD4Terms.apply(h, weight, target.long(), exponents, size, _compute_dtype(h))
