"""A trainable model: a denoiser network, a masking schedule and the objective that ties them.

:class:`MaskedDiffusion` is what the trainer optimises, checkpoints and evaluates. It holds the
network and, for GenMD4, the learnable schedule (so one optimiser, one EMA and one DDP wrapper
cover both). ``forward(x)`` returns the named loss terms of :mod:`maskdiff.losses`, with
``loss`` being the scalar to backpropagate (nats per token, averaged over the batch).

``method="ar"`` turns the same network (with causal attention) into an autoregressive baseline
trained by next-token cross-entropy: its ``nelbo`` is then an exact negative log-likelihood
(:func:`maskdiff.losses.ar_nll_terms`; docs/math.md, "Autoregressive baseline").

``forward(x, score_mask=...)`` sums every term over the scored positions only (the whole of x is
still the input and is masked as in training); zero-shot evaluation scores padded rows this way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from maskdiff.cross_entropy import linear_cross_entropy, linear_genmd4_terms
from maskdiff.losses import MaskedCrossEntropy, MaskedIntegrand, ar_nll_terms, genmd4_losses, md4_loss_terms
from maskdiff.networks import DenoiserBase
from maskdiff.schedules import GenMD4Schedule, Schedule

__all__ = ["MaskedDiffusion", "METHODS"]

METHODS = ("md4", "genmd4", "ar")


class MaskedDiffusion(nn.Module):
    """Denoiser + schedule + objective.

    Args:
        network: denoiser ``network(z (B, L), t (B,)) -> logits (B, L, V)``: a
            :class:`maskdiff.networks.Transformer` or :class:`maskdiff.networks.UNet`.
        schedule: a scalar schedule (MD4) or a :class:`GenMD4Schedule` (registered as a submodule).
        method: ``"md4"``, ``"genmd4"`` or ``"ar"``.
        t1: GenMD4's lower time limit. antithetic: stratified time sampling across the batch.
        label_dropout: probability of training a class-conditional network without its label.
        chunked_loss: MD4's cross-entropy and GenMD4's integrand through the head at masked
            positions only, in chunks (:mod:`maskdiff.cross_entropy`; same values, a fraction of
            the memory). False computes the full (B, L, V) logits first (the reference path).
    """

    def __init__(
        self,
        network: DenoiserBase,
        schedule: Schedule,
        method: str = "md4",
        *,
        t1: float = 1e-3,
        antithetic: bool = True,
        label_dropout: float = 0.0,
        chunked_loss: bool = True,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "genmd4" and not isinstance(schedule, GenMD4Schedule):
            raise ValueError("method 'genmd4' needs the per-token schedule: get_schedule('genmd4', vocab_size=V)")
        if method == "md4" and getattr(schedule, "per_token", False):
            raise ValueError("method 'md4' needs a scalar schedule; a per-token schedule trains with method 'genmd4'")
        if method == "ar" and not network.causal:
            raise ValueError("method 'ar' needs a causal network (TransformerConfig(causal=True))")
        self.network = network
        self.method = method
        self.t1 = t1
        self.antithetic = antithetic
        self.vocab_size = network.vocab_size
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        self.label_dropout = label_dropout
        # The losses apply the head to masked positions only, chunked (False: full logits).
        self.chunked_loss = chunked_loss
        # A learnable (nn.Module) schedule is registered as a submodule and trains with the network.
        self.schedule = schedule

    @property
    def time_conditioning(self) -> bool:
        return self.network.time_conditioning

    def denoiser(self, z: Tensor, t: Tensor) -> Tensor:
        """The network as a denoiser callable (logits in float32)."""
        return self.network(z, t).float()

    def _training_labels(self, labels: Tensor | None, generator: torch.Generator | None) -> Tensor | None:
        """Labels dropped to "no label" with probability ``label_dropout`` while training (for
        classifier-free guidance); None stays None."""
        if labels is None or not (self.training and self.label_dropout > 0):
            return labels
        device = generator.device if generator is not None else labels.device
        u = torch.rand(labels.shape, generator=generator, device=device).to(labels.device)
        return torch.where(u < self.label_dropout, torch.full_like(labels, self.network.null_label), labels)

    @staticmethod
    def _labels_for(labels: Tensor | None, batch: int) -> Tensor | None:
        """Labels for a batch of ``batch`` rows (GenMD4 evaluates two masked copies per sequence)."""
        if labels is None:
            return None
        repeat = batch // labels.shape[0]
        return labels.repeat(repeat) if repeat > 1 else labels

    def _conditioned(self, labels: Tensor | None) -> Any:
        """The network as a denoiser ``(z, t) -> logits`` with class labels bound."""
        if labels is None:
            return self.network

        def denoiser(z: Tensor, t: Tensor) -> Tensor:
            return self.network(z, t, labels=self._labels_for(labels, z.shape[0]))

        return denoiser

    def _chunked_cross_entropy(self, labels: Tensor | None) -> MaskedCrossEntropy:
        """Masked cross-entropy that applies the output head to masked positions only, in chunks
        (:mod:`maskdiff.cross_entropy`): same values as logits + ``masked_cross_entropy``, without
        the (B, L, V) logits."""

        def cross_entropy(z: Tensor, t: Tensor, x: Tensor, masked: Tensor) -> Tensor:
            hidden = self.network(z, t, labels=self._labels_for(labels, z.shape[0]), return_hidden=True)
            ce = torch.zeros(x.shape, dtype=torch.float32, device=hidden.device)
            selected = hidden[masked]  # (N, D): masked positions only
            if selected.shape[0] == 0:
                return ce + 0.0 * (hidden.sum() + self.network.head_weight.sum())  # every parameter stays in the graph (DDP)
            values = linear_cross_entropy(selected, self.network.head_weight, x[masked].long())  # (N,)
            return ce.masked_scatter(masked, values)

        return cross_entropy

    def _chunked_genmd4_terms(self, labels: Tensor | None) -> MaskedIntegrand:
        """GenMD4's per-position terms through the head at masked positions only, in chunks
        (:func:`maskdiff.cross_entropy.linear_genmd4_terms`): same values as logits +
        ``genmd4_position_terms``, without the (2B, L, V) logits."""

        def integrand(z: Tensor, t: Tensor, x: Tensor, masked: Tensor, w: Tensor) -> Tensor:
            hidden = self.network(z, t, labels=self._labels_for(labels, z.shape[0]), return_hidden=True)
            out = torch.zeros(x.shape, dtype=torch.float32, device=hidden.device)
            selected = hidden[masked]  # (N, D): masked positions only
            if selected.shape[0] == 0:
                return out + 0.0 * (hidden.sum() + self.network.head_weight.sum())  # every parameter stays in the graph (DDP)
            values = linear_genmd4_terms(selected, self.network.head_weight, x[masked].long(), w)  # (N,)
            return out.masked_scatter(masked, values)

        return integrand

    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
        labels: Tensor | None = None,
        *,
        score_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms for clean tokens x (B, L): per-sequence nats plus the scalar ``loss``.

        ``labels`` (B,) condition a class-conditional network. ``score_mask`` (bool (B, L)) sums
        the terms over the scored positions only, with the same random draws (see
        :mod:`maskdiff.losses`); ``loss`` still divides by L.
        """
        length = x.shape[1]
        labels = self._training_labels(labels, generator)
        network = self._conditioned(labels)
        if self.method == "ar":
            if labels is not None:
                raise ValueError("the autoregressive baseline takes no labels")
            terms = ar_nll_terms(self.network, x, score_mask=score_mask, vocab_size=self.vocab_size)
            terms["loss"] = terms["nelbo"].mean() / length
            return terms
        if self.method == "genmd4":
            if num_steps is not None:
                raise ValueError("GenMD4 has a continuous-time objective only; leave num_steps unset")
            terms = genmd4_losses(network, x, self.schedule, generator=generator, t1=self.t1,
                                  antithetic=self.antithetic, score_mask=score_mask,
                                  integrand=self._chunked_genmd4_terms(labels) if self.chunked_loss else None)
            terms["loss"] = terms["surrogate"].mean() / length
            return terms
        terms = md4_loss_terms(network, x, self.schedule, num_steps=num_steps, generator=generator,
                               antithetic=self.antithetic, vocab_size=self.vocab_size,
                               cross_entropy=self._chunked_cross_entropy(labels) if self.chunked_loss else None,
                               score_mask=score_mask)
        terms["loss"] = terms["nelbo"].mean() / length
        return terms

    def guided_denoiser(self, labels: Tensor | None, guidance: float = 0.0) -> Any:
        """A sampling denoiser for a class-conditional network, with classifier-free guidance.

        Logits ``(1 + w) · ℓ(z, t, y) - w · ℓ(z, t, ∅)`` for guidance weight ``w`` (0: plain
        conditional; labels None: unconditional). Returns float32 logits (B, L, V).
        """
        net = self.network
        if labels is None:
            return self.denoiser
        if net.num_classes == 0:
            raise ValueError("this model is not class-conditional; sample without labels")

        def denoiser(z: Tensor, t: Tensor) -> Tensor:
            y = labels.to(z.device)
            if y.shape[0] != z.shape[0]:  # the sampler may evaluate a subset of rows
                raise ValueError("guided sampling needs cache_scope='batch' (labels are per batch row)")
            cond = net(z, t, labels=y).float()
            if guidance == 0.0:
                return cond
            uncond = net(z, t, labels=torch.full_like(y, net.null_label)).float()
            return (1.0 + guidance) * cond - guidance * uncond

        denoiser.time_conditioning = net.time_conditioning  # type: ignore[attr-defined]
        return denoiser

    def schedule_stats(self) -> dict[str, float]:
        """min/mean/max of GenMD4's learned exponents (empty for scalar schedules)."""
        if isinstance(self.schedule, GenMD4Schedule):
            w = self.schedule.exponents.detach()
            return {"w_min": float(w.min()), "w_mean": float(w.mean()), "w_max": float(w.max())}
        return {}
