"""Recorded variants of the sequence transformer: the pieces that ``TransformerConfig`` selects.

Each option has the value that maskdiff 0.1/0.2 used and the value of the authors' reference
implementation (google-deepmind/md4); ``network.json`` records the choice, and a file written
before an option existed loads with the old value (:data:`LEGACY_VALUES`).

* ``mlp``: ``"swiglu"`` ``proj(silu(x W_g) * x W_u)``, or ``"glu"`` ``proj(sigmoid(x W_g) * x W_u)``.
* ``norm``: ``"rms"`` RMSNorm with a learned gain, or ``"layer"`` LayerNorm without gain or bias
  (with adaLN the modulation's ``1 + scale`` and ``shift`` already are a gain and a bias).
* ``mod_activation``: the activation between the time embedding ``c`` and the adaLN
  modulation layers: ``"silu"`` or ``"sigmoid"``.
* ``init``: ``"gpt2"`` N(0, 0.02) everywhere, residual projections N(0, 0.02/sqrt(2 n_layers));
  ``"fan_in"`` truncated normal with variance ``1/fan_in`` (attention, time MLP, embedding
  ``1/d``) and ``(2/n_layers)/fan_in`` for the MLP (the reference's depth-scaled init).
* ``head_init``: the output head starts at ``"zero"`` (maskdiff 0.1/0.2: the first prediction is
  uniform) or ``"fan_in"`` (truncated normal, variance ``1/d_model``; the default since 0.3).
  With a zero head every gradient upstream of it is zero at the first step and tiny for many
  after, so the body of the network starts learning late; without gradient clipping that cost
  0.1-0.3 bits/char at 600 steps on the demo model (``bench/RESULTS.md``, issue 18).
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CHOICES", "LEGACY_VALUES", "GLU", "SwiGLU", "make_norm", "make_mlp", "init_linear_fan_in"]

#: allowed values of each string option
CHOICES: dict[str, tuple[str, ...]] = {
    "mlp": ("swiglu", "glu"),
    "norm": ("rms", "layer"),
    "mod_activation": ("silu", "sigmoid"),
    "init": ("gpt2", "fan_in"),
    "head_init": ("fan_in", "zero"),
}

#: what a ``network.json`` without the key was built with (maskdiff 0.1 / 0.2)
LEGACY_VALUES: dict[str, Any] = {
    "residual_gates": False,
    "mlp": "swiglu",
    "norm": "rms",
    "mod_activation": "silu",
    "init": "gpt2",
    "time_mlp_hidden": None,
    "head_init": "zero",
}

class SwiGLU(nn.Module):
    """``proj(silu(x W_gate) * x W_up)`` with the gate and up projections fused in one matmul."""

    activation = staticmethod(F.silu)

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 2 * hidden, bias=False)
        self.proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) → (B, L, D)."""
        gate, up = self.fc(x).chunk(2, dim=-1)  # 2 × (B, L, hidden)
        return self.proj(self.activation(gate) * up)


class GLU(SwiGLU):
    """``proj(sigmoid(x W_gate) * x W_up)`` (Dauphin et al. 2017; the reference's ``mlp_type='glu'``)."""

    activation = staticmethod(F.sigmoid)


def make_mlp(kind: str, d_model: int, hidden: int) -> SwiGLU:
    """The MLP of a block; both kinds have the same parameters (``fc``, ``proj``)."""
    return GLU(d_model, hidden) if kind == "glu" else SwiGLU(d_model, hidden)


def make_norm(kind: str, d_model: int, eps: float) -> nn.Module:
    """RMSNorm with a learned gain (``"rms"``) or LayerNorm without parameters (``"layer"``)."""
    if kind == "layer":
        return nn.LayerNorm(d_model, eps=eps, elementwise_affine=False)
    return nn.RMSNorm(d_model, eps=eps)


def modulation_activation(kind: str, c: Tensor) -> Tensor:
    """The activation applied to the time embedding before the modulation layers."""
    return F.sigmoid(c) if kind == "sigmoid" else F.silu(c)


def _trunc_normal_(weight: Tensor, std: float) -> None:
    """Truncated normal at ±2 standard deviations of the untruncated normal, rescaled so that the
    result has standard deviation ``std`` (as ``flax``'s ``variance_scaling(..., 'truncated_normal')``)."""
    scale = std / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=scale, a=-2 * scale, b=2 * scale)


def init_linear_fan_in(linear: nn.Linear, gain: float = 1.0) -> None:
    """Variance ``gain / fan_in`` (truncated normal), zero bias."""
    _trunc_normal_(linear.weight, math.sqrt(gain / linear.in_features))
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
