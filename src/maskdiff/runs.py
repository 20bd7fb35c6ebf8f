"""Opening a trained run: the model, its config, its tokenizer — from the run folder alone.

The folder's format (files, checkpoints, atomic writes) belongs to :mod:`maskdiff.checkpoint`;
this module turns a folder back into objects. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskdiff.build import model_from_network
from maskdiff.checkpoint import RunFolderError, load_checkpoint
from maskdiff.config import RunConfig, config_from_dict
from maskdiff.data import tokenizer_for
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import build_network, network_config_from_dict

__all__ = ["LoadedRun", "load", "read_run_config", "read_metrics"]


@dataclass
class LoadedRun:
    """A trained model rebuilt from its run folder (see :func:`load`)."""

    path: Path
    config: RunConfig
    model: MaskedDiffusion  # in eval mode
    step: int
    weights: str  # "ema" or "raw"

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the run's corpus (characters for wiki-char/text8, GPT-2 otherwise)."""
        return tokenizer_for(self.config.data.corpus)


def read_run_config(path: str | os.PathLike) -> RunConfig:
    """The :class:`~maskdiff.config.RunConfig` stored in ``RUN/config.json``."""
    path = Path(path)
    for name in ("config.json", "network.json"):
        if not (path / name).is_file():
            raise RunFolderError(f"{path} is not a run folder: {name} is missing (a run folder is made by `maskdiff train`)")
    return config_from_dict(json.loads((path / "config.json").read_text()))


def load(path: str | os.PathLike, *, weights: str = "ema", device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a trained :class:`~maskdiff.model.MaskedDiffusion` from a run folder.

    Reads ``config.json``, ``network.json`` and the latest checkpoint's safetensors (``weights``:
    ``"ema"`` — what evaluation and sampling use — or ``"raw"``). Nothing is unpickled.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    path = Path(path)
    config = read_run_config(path)
    net_cfg = network_config_from_dict(json.loads((path / "network.json").read_text()))
    ckpt = load_checkpoint(path, with_optimizer=False, device=str(device))
    with torch.device("meta"):
        network = build_network(net_cfg)
    model = model_from_network(config, network)
    state = dict(ckpt.model)
    used = "raw"
    if weights == "ema" and ckpt.ema is not None:
        state.update(ckpt.ema)  # EMA holds every parameter; buffers come from the raw state
        used = "ema"
    model.load_state_dict(state, strict=True, assign=True)
    return LoadedRun(path, config, model.to(device).eval(), int(ckpt.state["step"]), used)


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """``metrics.jsonl`` as ``{"train": [...], "validation": [...]}``, each sorted by step.

    A resumed run logs some steps twice (those after its checkpoint); the later record wins.
    A truncated last line (a run killed while writing) is skipped.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has logged nothing yet (or {run_dir} is not a run folder)")
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            by_key[(rec.get("split", "train"), int(rec["step"]))] = rec
    out: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for (split, _), rec in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        out.setdefault(split, []).append(rec)
    return out
