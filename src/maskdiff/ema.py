"""Exponential moving average of a model's parameters (evaluation and sampling use it)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """``ema ← d · ema + (1 - d) · θ`` after every optimiser step, kept in float32.

    The effective decay is warmed up as ``d_k = min(decay, (1 + k) / (10 + k))`` at update k, so
    that a short run is not dominated by its random initialisation (with decay 0.9999 a plain EMA
    needs ~10⁴ steps to forget the start).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """Averaged parameters by name (as in ``model.named_parameters()``)."""
        return {name: t for name, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, Tensor], num_updates: int) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state[name])
        self.num_updates = num_updates

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (restored on exit)."""
        backup = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, s in zip(model.parameters(), self.shadow):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(model.parameters(), backup):
                    p.copy_(b)
