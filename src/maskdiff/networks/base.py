"""What every denoiser network shares: input checks, class labels, the time embedding and the
``save_pretrained`` / ``from_pretrained`` checkpoint format (``config.json`` + ``model.safetensors``,
nothing ever unpickled).

A network class derives from :class:`DenoiserBase` and registers itself in
:data:`maskdiff.networks.ARCHITECTURES`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from maskdiff.fileio import atomic_path

__all__ = ["DenoiserBase", "TimeEmbedding", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _may_sync() -> bool:
    """Whether input checks may read values back to the host: not while torch.compile traces
    (data-dependent branches) nor while a CUDA graph is being captured (syncs are illegal)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class TimeEmbedding(nn.Module):
    """t (B,) in [0, 1] → sinusoidal features of ``1000 t`` (B, freq_dim) → MLP → (B, cond_dim).

    The MLP's hidden width is ``hidden`` (default ``cond_dim``)."""

    def __init__(self, freq_dim: int, cond_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        hidden = cond_dim if hidden is None else hidden
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, cond_dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        k = torch.arange(half, device=t.device, dtype=torch.float32)  # (half,)
        freqs = torch.exp(-math.log(10000.0) * k / half)  # (half,) from 1 down to 1/10000
        args = 1000.0 * t.float()[:, None] * freqs[None, :]  # (B, half)
        features = torch.cat((args.cos(), args.sin()), dim=-1)  # (B, freq_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, cond_dim)


class DenoiserBase(nn.Module):
    """What every denoiser network shares: input checks, class labels and the checkpoint format.

    A subclass sets ``config_class`` (a dataclass with ``to_dict``/``from_dict``), ``model_type``
    (written to ``config.json``) and, in ``__init__``, the attributes ``config``, ``vocab_size``,
    ``mask_id``, ``seq_len``, ``time_conditioning``, ``causal``, ``num_classes``, ``null_label`` and
    ``label_emb``. Its ``forward(z, t=None, labels=None, *, return_hidden=False)`` returns logits
    (B, L, V) or the hidden states (B, L, D) that ``head_weight`` (V, D) maps to logits.
    """

    config_class: Any = None
    model_type: str = ""

    def _check_tokens(self, z: Tensor) -> Tensor:
        """Validate token ids (B, L); returns them as int64 unless already int32/int64."""
        if not isinstance(z, Tensor) or z.dtype not in _INTEGER_DTYPES:
            what = f"tensor of dtype {z.dtype}" if isinstance(z, Tensor) else type(z).__name__
            raise TypeError(f"z must be an integer tensor of token ids, got {what}")
        if z.dim() != 2 or z.shape[1] == 0:
            raise ValueError(f"z must have shape (B, L) with L >= 1, got {tuple(z.shape)}")
        if z.shape[1] > self.seq_len:
            raise ValueError(f"sequence length {z.shape[1]} exceeds the model's seq_len {self.seq_len}")
        # One host sync per call; skipped while torch.compile traces or a CUDA graph is captured.
        if _may_sync() and z.numel() and bool(((z < 0) | (z > self.mask_id)).any()):
            raise ValueError(
                f"token ids must lie in [0, {self.mask_id}] (vocab_size={self.vocab_size}, mask id "
                f"{self.mask_id}), got range [{int(z.min())}, {int(z.max())}]"
            )
        return z if z.dtype in (torch.int32, torch.int64) else z.long()  # nn.Embedding's index types

    def _check_time(self, t: Tensor | float | None, batch: int, device: torch.device) -> Tensor:
        if t is None:
            raise ValueError(
                "this model is time-conditioned (config.time_conditioning=True): pass t of shape (B,)"
            )
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        if tuple(t.shape) != (batch,):
            raise ValueError(f"t must have shape (B,) = ({batch},) or be a scalar, got {tuple(t.shape)}")
        return t

    def _label_embedding(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if self.label_emb is None:
            if labels is not None:
                raise ValueError("labels given, but this model has no class conditioning (config.num_classes=0)")
            return None
        if labels is None:
            labels = torch.full((batch,), self.null_label, device=device, dtype=torch.long)
        labels = torch.as_tensor(labels, device=device).long()
        if tuple(labels.shape) != (batch,):
            raise ValueError(f"labels must have shape (B,) = ({batch},), got {tuple(labels.shape)}")
        if _may_sync() and labels.numel() and (
            int(labels.min()) < 0 or int(labels.max()) > self.null_label
        ):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = no label)")
        return self.label_emb(labels)[:, None, :]  # (B, 1, D)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        Each file is written to a temporary file in the same directory and moved into place with
        ``os.replace``, so readers never see a half-written file. Tied embeddings are not a
        problem: the tied head reads the embedding matrix and stores nothing of its own; any
        other tensors sharing storage are cloned, as safetensors requires. Returns the directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        seen_storage: set[int] = set()
        for name, tensor in self.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen_storage:
                tensor = tensor.clone()
            seen_storage.add(storage)
            tensors[name] = tensor
        config = {"model_type": self.model_type, "format_version": FORMAT_VERSION, **self.config.to_dict()}
        config_text = json.dumps(config, indent=2) + "\n"
        metadata = {"format": "pt"}  # what Hugging Face tooling expects of PyTorch safetensors files
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        with atomic_path(directory / CONFIG_NAME) as tmp:
            tmp.write_text(config_text)
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> DenoiserBase:
        """Rebuild a model from a :meth:`save_pretrained` folder (JSON + safetensors only).

        The weights keep their stored dtype and are placed on ``map_location``. The model is
        returned in eval mode. Raises FileNotFoundError when a file is missing and ValueError
        when the config is malformed or does not match the stored tensors.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        missing_files = [p.name for p in (config_path, weights_path) if not p.is_file()]
        if missing_files:
            raise FileNotFoundError(
                f"{str(directory)!r} lacks {missing_files}; a save_pretrained folder holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (found: {sorted(os.listdir(directory))})"
            )
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"{config_path} is for model_type {model_type!r}, expected {cls.model_type!r}")
        version = raw.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{config_path} has format_version {version}; this code reads {FORMAT_VERSION}")
        config = cls.config_class.from_dict(raw)

        state = load_file(weights_path, device=str(torch.device(map_location)))
        with torch.device("meta"):
            model = cls(config)  # shapes only; every tensor is replaced by the stored one below
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        problems = [f"missing {name}" for name in expected if name not in state]
        problems += [f"unexpected {name}" for name in state if name not in expected]
        problems += [
            f"{name}: stored {tuple(state[name].shape)}, config implies {shape}"
            for name, shape in expected.items()
            if name in state and tuple(state[name].shape) != shape
        ]
        if problems:
            shown = "; ".join(problems[:10])
            if len(problems) > 10:
                shown += f"; ... ({len(problems) - 10} more)"
            raise ValueError(f"{weights_path} does not match {config_path}: {shown}")
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()
