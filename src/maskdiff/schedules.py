"""Masking schedules α(t): the probability that a token is still unmasked at time t.

Time runs from t = 0 (clean data) to t = 1 (everything masked). Every schedule exposes

* ``alpha(t, tokens=None)``       α(t)
* ``alpha_prime(t, tokens=None)`` α'(t) = dα/dt (≤ 0)
* ``weight(t, tokens=None)``      w(t) = -α'(t) / (1 - α(t)), the MD4 loss weight

on tensors. Scalar schedules (MD4) ignore the token values; the GenMD4 schedule gives every
vocabulary entry its own exponent, so its α depends on the token. Both follow one broadcasting
rule so that the losses and the sampler treat them alike (MD4 is the special case):

* ``tokens is None``: the result has the shape of ``t``;
* ``tokens`` of shape (B, *S): ``t`` of shape (B,) (or any prefix of ``tokens.shape``) is
  broadcast over the trailing dimensions and the result has the shape of ``tokens``.

Scalar schedules are clipped as in the reference code (docs/math.md, "Schedules"):
``α(t) = (1 - 2ε) α̃(t) + ε`` and ``α'(t) = (1 - 2ε) α̃'(t)``, so α(0) = 1 - ε and α(1) = ε.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Schedule",
    "ScalarSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "PolynomialSchedule",
    "GeometricSchedule",
    "GenMD4Schedule",
    "get_schedule",
    "SCHEDULE_NAMES",
]

DEFAULT_EPS = 1e-4


def broadcast_time(t: Tensor, tokens: Tensor | None) -> Tensor:
    """Broadcast per-sequence times ``t`` (B,) against ``tokens`` (B, *S) by appending dims."""
    if tokens is None:
        return t
    t = torch.as_tensor(t, device=tokens.device)
    if t.dim() > tokens.dim() or tuple(t.shape) != tuple(tokens.shape[: t.dim()]):
        raise ValueError(
            f"time of shape {tuple(t.shape)} does not broadcast against tokens of shape "
            f"{tuple(tokens.shape)}: pass one time per sequence (shape (B,)) or one per token"
        )
    return t.reshape(tuple(t.shape) + (1,) * (tokens.dim() - t.dim())).expand(tokens.shape)


class Schedule(ABC):
    """Interface shared by scalar (MD4) and per-token (GenMD4) masking schedules."""

    #: True when α depends on the token value (GenMD4).
    per_token: bool = False
    #: α at t = 0 and t = 1 (for a per-token schedule, the values common to every token).
    eps: float

    @abstractmethod
    def alpha(self, t: Tensor, tokens: Tensor | None = None) -> Tensor:
        """α(t): probability that a token is still unmasked at time t."""

    @abstractmethod
    def alpha_prime(self, t: Tensor, tokens: Tensor | None = None) -> Tensor:
        """α'(t) = dα/dt."""

    def weight(self, t: Tensor, tokens: Tensor | None = None) -> Tensor:
        """Loss weight w(t) = -α'(t) / (1 - α(t)) ≥ 0."""
        return -self.alpha_prime(t, tokens) / (1.0 - self.alpha(t, tokens))


class ScalarSchedule(Schedule):
    """A schedule shared by every token, clipped to [ε, 1 - ε]: α = (1 - 2ε) α̃ + ε."""

    name: str = "scalar"

    def __init__(self, eps: float = DEFAULT_EPS) -> None:
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"eps must lie in [0, 0.5), got {eps}")
        self.eps = float(eps)

    @abstractmethod
    def alpha_tilde(self, t: Tensor) -> Tensor:
        """Unclipped α̃(t)."""

    @abstractmethod
    def alpha_tilde_prime(self, t: Tensor) -> Tensor:
        """Unclipped α̃'(t)."""

    def alpha(self, t: Tensor, tokens: Tensor | None = None) -> Tensor:
        t = broadcast_time(t, tokens)
        return (1.0 - 2.0 * self.eps) * self.alpha_tilde(t) + self.eps

    def alpha_prime(self, t: Tensor, tokens: Tensor | None = None) -> Tensor:
        t = broadcast_time(t, tokens)
        return (1.0 - 2.0 * self.eps) * self.alpha_tilde_prime(t)

    def params(self) -> dict[str, Any]:
        """Constructor arguments, for configs and checkpoints."""
        return {"eps": self.eps}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class LinearSchedule(ScalarSchedule):
    """α̃(t) = 1 - t; w(t) = 1/t before clipping."""

    name = "linear"

    def alpha_tilde(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def alpha_tilde_prime(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)


class PolynomialSchedule(ScalarSchedule):
    """α̃(t) = 1 - t^k; w(t) = k/t before clipping."""

    name = "polynomial"

    def __init__(self, exponent: float = 1.0, eps: float = DEFAULT_EPS) -> None:
        super().__init__(eps)
        if not exponent > 0:
            raise ValueError(f"polynomial schedule needs exponent > 0, got {exponent}")
        self.exponent = float(exponent)

    def alpha_tilde(self, t: Tensor) -> Tensor:
        return 1.0 - t**self.exponent

    def alpha_tilde_prime(self, t: Tensor) -> Tensor:
        return -self.exponent * t ** (self.exponent - 1.0)

    def params(self) -> dict[str, Any]:
        return {"exponent": self.exponent, "eps": self.eps}


class CosineSchedule(ScalarSchedule):
    """α̃(t) = 1 - cos(π/2 · (1 - t)); w(t) = (π/2) tan(π/2 · (1 - t)) before clipping."""

    name = "cosine"

    def alpha_tilde(self, t: Tensor) -> Tensor:
        return 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))

    def alpha_tilde_prime(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))


class GeometricSchedule(ScalarSchedule):
    """α̃(t) = exp(-β_min^(1-t) β_max^t), α̃'(t) = -α̃ · β_min^(1-t) β_max^t · ln(β_max/β_min)."""

    name = "geometric"

    def __init__(self, beta_min: float = 1e-5, beta_max: float = 20.0, eps: float = DEFAULT_EPS) -> None:
        super().__init__(eps)
        if not 0 < beta_min < beta_max:
            raise ValueError(f"geometric schedule needs 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def _beta(self, t: Tensor) -> Tensor:
        # β_min^(1-t) β_max^t computed in log space for stability.
        return torch.exp((1.0 - t) * math.log(self.beta_min) + t * math.log(self.beta_max))

    def alpha_tilde(self, t: Tensor) -> Tensor:
        return torch.exp(-self._beta(t))

    def alpha_tilde_prime(self, t: Tensor) -> Tensor:
        beta = self._beta(t)
        return -torch.exp(-beta) * beta * math.log(self.beta_max / self.beta_min)

    def params(self) -> dict[str, Any]:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, "eps": self.eps}


class GenMD4Schedule(nn.Module, Schedule):
    """GenMD4's learnable per-token polynomial schedule (docs/math.md, "GenMD4").

    Vocabulary entry j has its own exponent ``w_j = softplus(φ_j) > 0`` and

        α_{t,j} = 1 - (1 - ε) t^{w_j},   α'_{t,j} = -(1 - ε) w_j t^{w_j - 1},   -α'/(1 - α) = w_j / t,

    so α_{0,j} = 1 exactly and α_{1,j} = ε. ``tokens`` (the clean token of each position, or
    ``torch.arange(V)`` for the whole vocabulary) selects the exponents.
    """

    per_token = True

    def __init__(self, vocab_size: int, init_exponent: float = 1.0, eps: float = DEFAULT_EPS) -> None:
        nn.Module.__init__(self)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if not init_exponent > 0:
            raise ValueError(f"init_exponent must be > 0, got {init_exponent}")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must lie in [0, 1), got {eps}")
        self.vocab_size = int(vocab_size)
        self.init_exponent = float(init_exponent)
        self.eps = float(eps)
        # φ = softplus⁻¹(k) = log(expm1(k)), so that softplus(φ) starts exactly at k.
        phi0 = math.log(math.expm1(init_exponent))
        self.phi = nn.Parameter(torch.full((vocab_size,), phi0))

    @property
    def exponents(self) -> Tensor:
        """w = softplus(φ), shape (V,)."""
        return F.softplus(self.phi)

    def token_exponents(self, tokens: Tensor) -> Tensor:
        """w_{tokens}: the exponent of each token, shape of ``tokens``."""
        if tokens is None:
            raise ValueError("GenMD4Schedule is per-token: pass the tokens whose schedule you want")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"tokens must lie in [0, {self.vocab_size}) (the mask id has no schedule), "
                f"got range [{int(tokens.min())}, {int(tokens.max())}]"
            )
        return self.exponents[tokens]

    def alpha(self, t: Tensor, tokens: Tensor | None = None) -> Tensor:
        w = self.token_exponents(tokens)
        t = broadcast_time(t, tokens).to(w.dtype)
        return 1.0 - (1.0 - self.eps) * t**w

    def alpha_prime(self, t: Tensor, tokens: Tensor | None = None) -> Tensor:
        w = self.token_exponents(tokens)
        t = broadcast_time(t, tokens).to(w.dtype)
        return -(1.0 - self.eps) * w * t ** (w - 1.0)

    def weight(self, t: Tensor, tokens: Tensor | None = None) -> Tensor:
        # Closed form w_j / t: exact, and avoids 0/0 where t^w underflows.
        w = self.token_exponents(tokens)
        t = broadcast_time(t, tokens).to(w.dtype)
        return w / t

    def log_alpha_complement(self, t: Tensor, tokens: Tensor) -> Tensor:
        """log(1 - α_{t,x}) = log(1 - ε) + w_x log t: log-probability that a token is masked."""
        w = self.token_exponents(tokens)
        t = broadcast_time(t, tokens).to(w.dtype)
        return math.log1p(-self.eps) + w * torch.log(t)

    def params(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "init_exponent": self.init_exponent, "eps": self.eps}

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, init_exponent={self.init_exponent}, eps={self.eps}"


_SCALAR = {cls.name: cls for cls in (LinearSchedule, CosineSchedule, PolynomialSchedule, GeometricSchedule)}
SCHEDULE_NAMES = tuple(_SCALAR) + ("genmd4",)


def get_schedule(name: str, **params: Any) -> Schedule:
    """Build a schedule by name.

    Names: ``"linear"``, ``"cosine"``, ``"polynomial"`` (``exponent``), ``"geometric"``
    (``beta_min``, ``beta_max``), each taking ``eps``; ``"genmd4"`` (``vocab_size``,
    ``init_exponent``, ``eps``) returns the learnable per-token schedule (an ``nn.Module``).
    """
    key = name.lower()
    if key == "genmd4":
        cls: type = GenMD4Schedule
    elif key in _SCALAR:
        cls = _SCALAR[key]
    else:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    try:
        return cls(**params)
    except TypeError as err:
        raise TypeError(f"bad parameters for schedule {name!r}: {err}") from None
