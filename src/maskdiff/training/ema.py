"""Exponential moving average of a model's parameters (evaluation and sampling use it).

The average is kept in the same layout as the parameters: with FSDP (``train.parallel=fsdp``)
the parameters are sharded DTensors and so are the averages, so every process keeps only its
shard. :meth:`EMA.full_state_dict` / :meth:`EMA.load_full_state_dict` convert to and from full
tensors for checkpoints (collectives then: every process must call them).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch build without distributed support: nothing is ever sharded
    DTensor = None  # type: ignore[assignment,misc]


def _is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)

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
    def update(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """One averaging step. ``skip``: a 0-d bool tensor; when true the average stays where it
        is (the optimiser step was skipped on the device), decided without a host sync. The
        update is counted either way (the trainer corrects the count when it reads the flags)."""
        d = self.current_decay()
        params = [p.detach().float() for p in model.parameters()]
        if skip is None:
            torch._foreach_lerp_(self.shadow, params, 1.0 - d)
        else:
            weight = torch.where(skip, 0.0, 1.0 - d).to(device=self.shadow[0].device, dtype=torch.float32)
            torch._foreach_lerp_(self.shadow, params, [weight] * len(params))
        self.num_updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """Averaged parameters by name (as in ``model.named_parameters()``)."""
        return {name: t for name, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, Tensor], num_updates: int) -> None:
        missing = self.missing(state)
        if missing:
            raise ValueError(f"EMA state lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state[name])
        self.num_updates = num_updates

    def missing(self, state: dict[str, Tensor]) -> list[str]:
        """Names of averaged parameters that ``state`` lacks."""
        return [n for n in self.names if n not in state]

    @torch.no_grad()
    def full_state_dict(self, *, keep: bool = True) -> dict[str, Tensor]:
        """Averaged parameters by name as full (unsharded) float32 CPU tensors.

        With sharded (DTensor) averages this is a collective: every process must call it. Each
        tensor is gathered one at a time, so no process holds more than one full parameter on
        its device; processes with ``keep=False`` take part in the gathers but return an empty
        dict (only the process that writes the checkpoint needs the full state in host memory).
        """
        out: dict[str, Tensor] = {}
        for name, t in zip(self.names, self.shadow):
            full = t.full_tensor() if _is_sharded(t) else t
            if keep:
                out[name] = full.detach().cpu()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Tensor] | None, num_updates: int, *, src: int = 0) -> None:
        """Load full (unsharded) averages, e.g. from a checkpoint, into possibly sharded averages.

        With sharded averages this is a collective: only process ``src`` needs ``state`` (others
        may pass None), and each tensor is scattered from it. Without sharding it is
        :meth:`load_state_dict`. Check names with :meth:`missing` first: a process that raises
        here would leave the others waiting.
        """
        if not any(_is_sharded(t) for t in self.shadow):
            if state is None:
                raise ValueError("unsharded EMA: load_full_state_dict needs the state on every process")
            self.load_state_dict(state, num_updates)
            return
        for name, t in zip(self.names, self.shadow):
            local = t.to_local()
            if state is not None:
                full = state[name].to(device=local.device, dtype=t.dtype)
            else:  # receives its shard from process src; the values here are never read
                full = torch.empty(t.shape, dtype=t.dtype, device=local.device)
            t.copy_(distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=src))
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
