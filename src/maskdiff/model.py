"""A trainable model: a denoiser network, a masking schedule and the objective that ties them.

:class:`MaskedDiffusion` is what the trainer optimises, checkpoints and evaluates. It holds the
network and, for GenMD4, the learnable schedule (so one optimiser, one EMA and one DDP wrapper
cover both). ``forward(x)`` returns the named loss terms of :mod:`maskdiff.losses`, with
``loss`` being the scalar to backpropagate (nats per token, averaged over the batch).

``method="ar"`` turns the same network (with causal attention) into an autoregressive baseline
trained by next-token cross-entropy: its ``nelbo`` is then an exact negative log-likelihood.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskdiff.losses import genmd4_losses, md4_loss_terms
from maskdiff.network import Transformer, TransformerConfig
from maskdiff.schedules import GenMD4Schedule, Schedule, get_schedule

__all__ = ["MaskedDiffusion", "build_schedule", "build_model"]

METHODS = ("md4", "genmd4", "ar")


class MaskedDiffusion(nn.Module):
    """Denoiser + schedule + objective.

    Args:
        network: denoiser ``network(z (B, L), t (B,)) -> logits (B, L, V)``.
        schedule: a scalar schedule (MD4) or a :class:`GenMD4Schedule` (registered as a submodule).
        method: ``"md4"``, ``"genmd4"`` or ``"ar"``.
        t1: GenMD4's lower time limit. antithetic: stratified time sampling across the batch.
    """

    def __init__(
        self,
        network: Transformer,
        schedule: Schedule,
        method: str = "md4",
        *,
        t1: float = 1e-3,
        antithetic: bool = True,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "genmd4" and not isinstance(schedule, GenMD4Schedule):
            raise ValueError("method 'genmd4' needs the per-token schedule: get_schedule('genmd4', vocab_size=V)")
        if method == "ar" and not network.causal:
            raise ValueError("method 'ar' needs a causal network (TransformerConfig(causal=True))")
        self.network = network
        self.method = method
        self.t1 = t1
        self.antithetic = antithetic
        self.vocab_size = network.vocab_size
        # A learnable (nn.Module) schedule is registered as a submodule and trains with the network.
        self.schedule = schedule

    @property
    def time_conditioning(self) -> bool:
        return self.network.time_conditioning

    def denoiser(self, z: Tensor, t: Tensor) -> Tensor:
        """The network as a denoiser callable (logits in float32)."""
        return self.network(z, t).float()

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None, num_steps: int | None = None
    ) -> dict[str, Tensor]:
        """Loss terms for clean tokens x (B, L): per-sequence nats plus the scalar ``loss``."""
        length = x.shape[1]
        if self.method == "ar":
            terms = self._autoregressive_terms(x)
            terms["loss"] = terms["nelbo"].mean() / length
            return terms
        if self.method == "genmd4":
            if num_steps is not None:
                raise ValueError("GenMD4 has a continuous-time objective only; leave num_steps unset")
            terms = genmd4_losses(self.network, x, self.schedule, generator=generator, t1=self.t1,
                                  antithetic=self.antithetic)
            terms["loss"] = terms["surrogate"].mean() / length
            return terms
        terms = md4_loss_terms(self.network, x, self.schedule, num_steps=num_steps, generator=generator,
                               antithetic=self.antithetic, vocab_size=self.vocab_size)
        terms["loss"] = terms["nelbo"].mean() / length
        return terms

    def _autoregressive_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Next-token NLL: the input is x shifted right by one with the mask id as BOS."""
        bos = torch.full_like(x[:, :1], self.vocab_size)
        inputs = torch.cat([bos, x[:, :-1]], dim=1)  # (B, L)
        logits = self.network(inputs, None).float()  # (B, L, V)
        nll = F.cross_entropy(logits.flatten(0, 1), x.flatten().long(), reduction="none").view(x.shape).sum(1)
        zero = torch.zeros_like(nll)
        return {"diffusion": nll, "reconstruction": zero, "prior": zero, "nelbo": nll}

    def schedule_stats(self) -> dict[str, float]:
        """min/mean/max of GenMD4's learned exponents (empty for scalar schedules)."""
        if isinstance(self.schedule, GenMD4Schedule):
            w = self.schedule.exponents.detach()
            return {"w_min": float(w.min()), "w_mean": float(w.mean()), "w_max": float(w.max())}
        return {}


def build_schedule(diffusion: Any, vocab_size: int) -> Schedule:
    """The schedule of a :class:`maskdiff.config.DiffusionConfig`."""
    if diffusion.method == "genmd4":
        return get_schedule("genmd4", vocab_size=vocab_size, init_exponent=diffusion.init_exponent, eps=diffusion.eps)
    name = diffusion.schedule
    params: dict[str, Any] = {"eps": diffusion.eps}
    if name == "polynomial":
        params["exponent"] = diffusion.exponent
    elif name == "geometric":
        params.update(beta_min=diffusion.beta_min, beta_max=diffusion.beta_max)
    return get_schedule(name, **params)


def build_model(config: Any, vocab_size: int) -> MaskedDiffusion:
    """Build the MaskedDiffusion of a :class:`maskdiff.config.RunConfig` for a vocabulary of V."""
    m, d = config.model, config.diffusion
    net_cfg = TransformerConfig(
        vocab_size=vocab_size,
        seq_len=config.data.seq_len,
        n_layers=m.n_layers,
        d_model=m.d_model,
        n_heads=m.n_heads,
        mlp_ratio=m.mlp_ratio,
        time_conditioning=m.time_conditioning,
        causal=m.causal,
        dropout=m.dropout,
    )
    return MaskedDiffusion(Transformer(net_cfg), build_schedule(d, vocab_size), d.method, t1=d.t1,
                           antithetic=d.antithetic)
