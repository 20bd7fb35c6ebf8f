"""Run folders and checkpoints: atomic, resumable, and never unpickling code.

Layout of a run folder::

    RUN/
      config.json          resolved RunConfig
      network.json         the network's config (TransformerConfig or UNetConfig; vocabulary size and length included)
      meta.json            code version (git commit if available), library versions, command
      metrics.jsonl        one JSON object per log line (train and validation)
      checkpoints/
        latest             name of the newest complete checkpoint (replaced atomically)
        step-00001000/
          model.safetensors      trained weights (network + learnable schedule)
          ema.safetensors        EMA weights (what evaluation and sampling use)
          optimizer.pt           optimiser state (tensors and numbers only; loaded weights_only)
          rng.safetensors        generator states of every data / loss stream, torch CPU/CUDA RNG
          state.json             step, tokens seen, world size, EMA update count
      pretrained/          the EMA denoiser in save_pretrained form (end of training)

A checkpoint is written into ``step-N.tmp/`` and renamed to ``step-N/`` only once complete; then
``latest`` is replaced. A process killed mid-write leaves a ``.tmp`` folder that is ignored (and
cleaned up) on resume, and the previous checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from maskdiff._version import __version__
from maskdiff.fileio import write_json_atomic

__all__ = [
    "RunFolderError",
    "prepare_run_folder",
    "write_json_atomic",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "Checkpoint",
    "environment_info",
    "checkpoint_step",
]

CHECKPOINTS = "checkpoints"
LATEST = "latest"


class RunFolderError(RuntimeError):
    """A run folder is missing, incomplete, or would be overwritten."""


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info() -> dict[str, Any]:
    """Code version and library versions, recorded next to every run."""
    from importlib import metadata

    versions = {}
    for dist in ("torch", "numpy", "safetensors", "tiktoken", "datasets", "tqdm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "maskdiff_version": __version__,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": versions,
        "cuda": torch.version.cuda,
        "command": sys.argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_run_folder(path: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """Create (or check, when resuming) a run folder; never silently replace an existing run.

    * new folder, or an existing empty one: used as is;
    * existing run with ``resume``: kept, training continues from its latest checkpoint;
    * existing run with ``overwrite``: the old folder is *moved* to ``PATH.old-<time>``, not deleted;
    * otherwise: :class:`RunFolderError` saying which flag to pass.
    """
    path = Path(path)
    exists = path.exists() and any(path.iterdir()) if path.is_dir() else path.exists()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path} exists and is not a folder; choose another --out")
    if resume:
        if not exists:
            raise RunFolderError(f"cannot resume: {path} holds no run; start one without --resume")
        return path
    if exists:
        if not overwrite:
            raise RunFolderError(
                f"run folder {path} already exists; pass --resume to continue it, --overwrite to "
                f"start afresh (the old folder is kept as {path}.old-<time>), or choose another --out"
            )
        backup = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(backup)
        print(f"moved the existing run folder to {backup}", file=sys.stderr)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    optimizer: dict[str, Any] | None
    rng: dict[str, Tensor]
    state: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path))


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: dict[str, Tensor],
    ema: dict[str, Tensor] | None,
    optimizer: dict[str, Any] | None,
    rng: dict[str, Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep`` ones."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f"{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(model, tmp / "model.safetensors")
    if ema is not None:
        _save_tensors(ema, tmp / "ema.safetensors")
    if optimizer is not None:
        torch.save(optimizer, tmp / "optimizer.pt")
    _save_tensors(rng, tmp / "rng.safetensors")
    with open(tmp / "state.json", "w") as f:
        json.dump({**state, "step": step}, f, indent=2)
    for file in tmp.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step (e.g. re-saved after resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp"))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    # No pointer (or it names a pruned folder): take the newest complete one.
    complete = sorted(
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp") and (p / "state.json").is_file()
    )
    return complete[-1] if complete else None


def load_checkpoint(run_dir: str | os.PathLike, *, with_optimizer: bool = True, device: str = "cpu") -> Checkpoint:
    """Read the latest complete checkpoint of a run (safetensors / JSON / weights-only torch)."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise RunFolderError(
            f"{run_dir} holds no complete checkpoint (looked in {run_dir / CHECKPOINTS}); "
            f"train it first, or point to another run folder"
        )
    for stale in (run_dir / CHECKPOINTS).glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
    model = load_file(str(ckpt / "model.safetensors"), device=device)
    ema = load_file(str(ckpt / "ema.safetensors"), device=device) if (ckpt / "ema.safetensors").is_file() else None
    optimizer = None
    if with_optimizer and (ckpt / "optimizer.pt").is_file():
        # weights_only=True: tensors, numbers and containers only; no code is unpickled.
        optimizer = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
    rng = load_file(str(ckpt / "rng.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())
    return Checkpoint(ckpt, model, ema, optimizer, rng, state)


def checkpoint_step(run_dir: str | os.PathLike) -> int | None:
    """The training step of the run's latest complete checkpoint, or None when it has none."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    return int(json.loads((ckpt / "state.json").read_text())["step"])
