"""Opening a trained run: the model, its config, its tokenizer — from the run folder alone.

The folder's format (files, checkpoints, atomic writes) belongs to :mod:`maskdiff.checkpoint`;
this module turns a folder back into objects. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskdiff.build import model_from_network
from maskdiff.checkpoint import RunFolderError, load_checkpoint
from maskdiff.config import RunConfig, config_from_dict
from maskdiff.data import DataError, read_run_tokenizer, tokenizer_for
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import build_network, network_config_from_dict

__all__ = ["LoadedRun", "load", "read_run_config", "read_network_config", "read_metrics"]


@dataclass
class LoadedRun:
    """A trained model rebuilt from its run folder (see :func:`load`)."""

    path: Path
    config: RunConfig
    model: MaskedDiffusion  # in eval mode
    step: int
    weights: str  # "ema" or "raw"
    stored_tokenizer: Any = field(default=None, repr=False)  # RUN/tokenizer.json (data.corpus=files runs)

    @property
    def tokenizer(self) -> Any:
        """The run's tokenizer: the one stored in its folder (``tokenizer.json``: runs on your own files,
        whose vocabulary was built from their training split), else the corpus's (characters for
        wiki-char/text8, GPT-2 otherwise)."""
        if self.stored_tokenizer is not None:
            return self.stored_tokenizer
        return tokenizer_for(self.config.data.corpus)


def _read_json_file(file: Path, what: str) -> Any:
    """The JSON content of one of the run's files, or RunFolderError naming it."""
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RunFolderError(f"{file} is not readable JSON ({err}); it should hold {what}, as written by "
                             f"`maskdiff train`") from None


def read_run_config(path: str | os.PathLike) -> RunConfig:
    """The :class:`~maskdiff.config.RunConfig` stored in ``RUN/config.json``.

    Raises:
        RunFolderError: the folder is not a run, or ``config.json`` is not a valid run config
            (the message names the file).
    """
    path = Path(path)
    for name in ("config.json", "network.json"):
        if not (path / name).is_file():
            raise RunFolderError(f"{path} is not a run folder: {name} is missing (a run folder is made by `maskdiff train`)")
    file = path / "config.json"
    data = _read_json_file(file, "the run's config")
    try:
        if not isinstance(data, dict):
            raise TypeError(f"a JSON object is expected, not {type(data).__name__}")
        return config_from_dict(data)
    except (TypeError, ValueError, AttributeError) as err:
        raise RunFolderError(f"{file} is not a valid run config ({err})") from None


def read_network_config(path: str | os.PathLike) -> Any:
    """The network config stored in ``RUN/network.json`` (TransformerConfig or UNetConfig).

    Raises:
        RunFolderError: ``network.json`` is missing or not a valid network config (the message names it).
    """
    file = Path(path) / "network.json"
    data = _read_json_file(file, "the network's config")
    try:
        if not isinstance(data, dict):
            raise TypeError(f"a JSON object is expected, not {type(data).__name__}")
        return network_config_from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise RunFolderError(f"{file} is not a valid network config ({err})") from None


def _check_agreement(path: Path, config: RunConfig, net_cfg: Any, model: Any, state: dict[str, Any],
                     ckpt: Path) -> None:
    """One line naming what disagrees when network.json, config.json and the checkpoint do not fit."""
    if getattr(net_cfg, "seq_len", config.data.seq_len) != config.data.seq_len:
        raise RunFolderError(f"{path / 'network.json'} says seq_len={net_cfg.seq_len} but {path / 'config.json'} "
                             f"says data.seq_len={config.data.seq_len}; the run folder's files disagree")
    expected = model.state_dict()  # shapes only: the model lives on the meta device
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    fields = ", ".join(f"{k}={getattr(net_cfg, k)}" for k in ("vocab_size", "seq_len", "d_model", "n_layers")
                       if hasattr(net_cfg, k))
    if wrong:
        k = wrong[0]
        detail = (f"{k} has shape {tuple(state[k].shape)} in the checkpoint but {tuple(expected[k].shape)} for "
                  f"network.json ({fields}){f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}")
    else:
        detail = (f"{len(missing)} tensor(s) network.json needs are not in the checkpoint (e.g. {missing[:1]}) "
                  f"and {len(unexpected)} in it are unknown (e.g. {unexpected[:1]}); network.json: {fields}")
    raise RunFolderError(f"{path / 'network.json'} does not match the checkpoint {ckpt / 'model.safetensors'}: "
                         f"{detail}; restore the network.json the run was trained with")


def load(path: str | os.PathLike, *, weights: str = "ema", device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a trained :class:`~maskdiff.model.MaskedDiffusion` from a run folder.

    Reads ``config.json``, ``network.json`` and the latest checkpoint's safetensors (``weights``:
    ``"ema"`` — what evaluation and sampling use — or ``"raw"``). Nothing is unpickled, and
    nothing in the folder is created, renamed or deleted.

    Raises:
        RunFolderError: a file is missing, damaged, or disagrees with another (one line naming it).
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    path = Path(path)
    config = read_run_config(path)
    net_cfg = read_network_config(path)
    ckpt = load_checkpoint(path, with_optimizer=False, device=str(device))
    try:
        with torch.device("meta"):
            network = build_network(net_cfg)
        model = model_from_network(config, network)
    except (ValueError, TypeError, RuntimeError) as err:
        raise RunFolderError(f"cannot build the network of {path} from network.json and config.json ({err})") from None
    state = dict(ckpt.model)
    used = "raw"
    if weights == "ema" and ckpt.ema is not None:
        state.update(ckpt.ema)  # EMA holds every parameter; buffers come from the raw state
        used = "ema"
    _check_agreement(path, config, net_cfg, model, state, ckpt.path)
    tokenizer = _stored_tokenizer(path, config, net_cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return LoadedRun(path, config, model.to(device).eval(), int(ckpt.state["step"]), used, tokenizer)


def _stored_tokenizer(path: Path, config: RunConfig, net_cfg: Any) -> Any:
    """The tokenizer in ``RUN/tokenizer.json`` (None for runs on built-in corpora, which have none),
    checked against the network's vocabulary."""
    try:
        tokenizer = read_run_tokenizer(path)
    except DataError as err:
        raise RunFolderError(str(err)) from None
    if tokenizer is None:
        if config.data.corpus.lower() == "files":
            raise RunFolderError(f"{path / 'tokenizer.json'} is missing: a data.corpus=files run keeps its tokenizer "
                                 "there; restore the file the run was trained with")
        return None
    if tokenizer.vocab_size != getattr(net_cfg, "vocab_size", tokenizer.vocab_size):
        raise RunFolderError(f"{path / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but network.json says "
                             f"vocab_size={net_cfg.vocab_size}; restore the tokenizer.json the run was trained with")
    return tokenizer


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
