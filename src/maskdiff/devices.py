"""Choosing the torch device: the one place that turns ``"auto"`` (or a name) into a device."""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device for ``name``.

    ``"auto"`` (or None) is ``cuda:LOCAL_RANK`` when CUDA is available (``LOCAL_RANK`` is set by
    torchrun; 0 otherwise) and the CPU elsewhere. Any other name is passed to ``torch.device``;
    a CUDA device on a machine without CUDA raises RuntimeError naming the alternatives.
    """
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(name)!r} was requested but CUDA is not available here; use cpu or auto")
    return device
