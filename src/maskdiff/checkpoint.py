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
      .lock                while a trainer writes the run: its PID and host (flock-ed; see fileio)

One writer per run: :func:`open_run_folder` takes the folder's lock, and a second writer fails at
once with the holder's PID. Readers (:func:`latest_checkpoint`, :func:`load_checkpoint`,
``maskdiff.load``) never create, rename or delete anything in the folder.

A checkpoint is written into ``step-N.tmp/`` and renamed to ``step-N/`` only once complete; then
``latest`` is replaced. A process killed mid-write leaves a ``.tmp`` folder that readers ignore
and the next writer removes (:func:`clean_stale_checkpoints`, on resume); the previous checkpoint
stays the latest. A write that fails (disk full) leaves the previous checkpoint the latest and
raises :class:`RunWriteError`. ``latest`` naming a missing step is an error naming the newest
complete one (see :func:`latest_checkpoint`), never a silent fall-back to another step.
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
from maskdiff.fileio import LOCK_NAME, FolderLock, write_json_atomic

__all__ = [
    "RunFolderError",
    "RunWriteError",
    "open_run_folder",
    "prepare_run_folder",
    "clean_stale_checkpoints",
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
    """A run folder is missing, incomplete, damaged, or would be overwritten (a user error: exit 2)."""

    exit_code = 2


class RunWriteError(RunFolderError):
    """Writing into a run failed (disk full, I/O error): the work failed (exit 1); what was
    written before is intact."""

    exit_code = 1


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


def _holds_a_run(path: Path) -> bool:
    """Whether ``path`` holds anything but a lock file (a folder with only ``.lock`` is empty)."""
    return path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir())


def _unwritable(path: Path) -> Path | None:
    """The first of the run's folder, ``checkpoints/`` and ``metrics.jsonl`` this process may not write."""
    for p in (path, path / CHECKPOINTS, path / "metrics.jsonl"):
        if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
            return p
    return None


def _backup_name(path: Path) -> Path:
    """``PATH.old-<time>``, or ``PATH.old-<time>-2``, ``-3``, ... when that name is taken."""
    base = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    candidate, i = base, 2
    while candidate.exists() or candidate.is_symlink():
        candidate, i = base.with_name(f"{base.name}-{i}"), i + 1
    return candidate


def _move_aside(path: Path) -> None:
    """``--overwrite``: move the run at ``path`` to a free backup name, holding its lock meanwhile."""
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents:
        raise RunFolderError(
            f"--overwrite would move {path} aside, but it holds the current folder {here}; "
            f"run the command from another folder, or choose another --out")
    old = FolderLock.acquire(path)  # refuses while another process writes the run
    backup = _backup_name(target)
    try:
        target.rename(backup)
    except OSError as err:
        old.release()
        raise RunFolderError(f"cannot move {path} aside to {backup} ({err.strerror}); "
                             f"move or delete it yourself, or choose another --out") from None
    old.release(moved_to=backup)
    print(f"moved the existing run folder to {backup}", file=sys.stderr)


def open_run_folder(path: str | os.PathLike, *, resume: bool, overwrite: bool) -> FolderLock:
    """Check the flags against the folder, create it if new, and take its write lock (the writer's entry).

    * new folder, or an existing empty one: created / used as is;
    * existing run with ``resume``: kept; refused when this process may not write it;
    * existing run with ``overwrite``: the old folder is *moved* to ``PATH.old-<time>`` (a free
      name), not deleted; refused when ``PATH`` holds the current folder;
    * ``resume`` with ``overwrite``: refused (they contradict each other);
    * otherwise: :class:`RunFolderError` saying which flag to pass.

    Every check runs before anything is written. Returns the lock; release it
    (:meth:`FolderLock.release`) when done writing. Only the lock holder may remove a killed
    writer's temporary folders (:func:`clean_stale_checkpoints`).

    Raises:
        RunFolderError: a check failed. FolderLockedError: another process writes the folder.
    """
    path = Path(path)
    if resume and overwrite:
        raise RunFolderError("--resume continues the run, --overwrite moves it aside to start afresh: pass one of them")
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path} exists and is not a folder; choose another --out")
    exists = _holds_a_run(path)
    if resume:
        if not exists:
            raise RunFolderError(f"cannot resume: {path} holds no run; start one without --resume")
        blocked = _unwritable(path)
        if blocked is not None:
            raise RunFolderError(
                f"cannot resume: {blocked} is read-only for this user; copy the run to a folder you can write "
                f"to and resume the copy (cp -r {path} NEW && maskdiff train --out NEW --resume)")
        return FolderLock.acquire(path)
    if exists:
        if not overwrite:
            raise RunFolderError(
                f"run folder {path} already exists; pass --resume to continue it, --overwrite to "
                f"start afresh (the old folder is kept as {path}.old-<time>), or choose another --out"
            )
        _move_aside(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot create the run folder {path} ({err.strerror}); choose another --out") from None
    if _unwritable(path) is not None:
        raise RunFolderError(f"cannot write into {path} (read-only for this user); choose another --out")
    return FolderLock.acquire(path)


def prepare_run_folder(path: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """:func:`open_run_folder` without keeping the lock (the checks, the move aside, the folder)."""
    open_run_folder(path, resume=resume, overwrite=overwrite).release()
    return Path(path)


def clean_stale_checkpoints(run_dir: str | os.PathLike) -> list[str]:
    """Remove what a writer killed mid-save left in ``checkpoints/`` (``*.tmp``); the writer's job.

    Call it only while holding the run's lock: a live writer's temporary folder looks the same.
    Returns the names removed.
    """
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    for stale in sorted(root.glob("*.tmp")) + sorted(root.glob(".*.tmp")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale.name)
    return removed


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


def _complete(root: Path) -> list[Path]:
    """The complete checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".tmp") and (p / "state.json").is_file())


def _write_checkpoint_files(tmp: Path, tensors: dict[str, dict[str, Tensor] | None],
                            optimizer: dict[str, Any] | None, state: dict[str, Any]) -> None:
    for name, values in tensors.items():
        if values is not None:
            _save_tensors(values, tmp / f"{name}.safetensors")
    if optimizer is not None:
        torch.save(optimizer, tmp / "optimizer.pt")
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=2)
    for file in tmp.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Move a complete ``tmp`` to ``final`` and point ``latest`` at it."""
    replaced = None
    if final.exists():  # a checkpoint of the same step (e.g. re-saved after resume): replace it
        replaced = final.with_name(f"{final.name}.replaced.tmp")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync_dir(root)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


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
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep`` ones (0: keep all).

    Only the run's writer (the holder of its lock) may call this. A write that fails (disk full,
    I/O error) removes its temporary folder and raises :class:`RunWriteError`; the previous
    checkpoint stays the latest and nothing is pruned.
    """
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f"{name}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_checkpoint_files(tmp, {"model": model, "ema": ema, "rng": rng}, optimizer, {**state, "step": step})
        _publish(root, tmp, final)
    except Exception as err:  # OSError, or torch's / safetensors' wrappers of one
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in _complete(root) if p.name != name]
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
        raise RunWriteError(
            f"could not write checkpoint {name} into {root} ({reason}); "
            + (f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists")
            + "; free some space (or fix the folder) and continue with --resume") from None
    complete = _complete(root)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None when it has none. Reads only.

    It is the folder ``checkpoints/latest`` names. When ``latest`` names a folder that is missing
    or incomplete (deleted by hand, or a copy of the run that is not whole) this raises
    :class:`RunFolderError` naming it and the newest complete one, rather than silently
    using another step. Without a ``latest`` file, the newest complete folder.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    pointer = root / LATEST
    complete = _complete(root)
    if not pointer.is_file():
        return complete[-1] if complete else None
    try:
        named = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise RunFolderError(f"cannot read {pointer} ({err})") from None
    candidate = root / named
    if named and "/" not in named and (candidate / "state.json").is_file():
        return candidate
    fix = (f"the newest complete one is {complete[-1].name}: to use it, write its name into {pointer}"
           if complete else "no complete checkpoint is left; train the run again")
    raise RunFolderError(f"{pointer} names {named!r}, which is missing or incomplete; {fix}")


def _previous(ckpt: Path) -> str:
    """What to say about the checkpoint before ``ckpt`` when ``ckpt`` cannot be read."""
    older = [p for p in _complete(ckpt.parent) if p.name < ckpt.name]
    if not older:
        return "no earlier checkpoint is left"
    return (f"the previous checkpoint {older[-1].name} may be used instead: write its name into "
            f"{ckpt.parent / LATEST}")


def _read_tensors(file: Path, device: str) -> dict[str, Tensor]:
    try:
        return load_file(str(file), device=device)
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors' errors: truncated, not a safetensors file, bad header
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunFolderError(f"{file} is damaged or not a safetensors file ({reason}); {_previous(file.parent)}") from None


def _read_optimizer(file: Path, device: str) -> dict[str, Any]:
    try:
        # weights_only=True: tensors, numbers and containers only; no code is unpickled.
        optimizer = torch.load(file, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunFolderError(
            f"{file} refused: it is damaged or holds more than tensors and numbers (loaded weights-only: {first}); "
            f"{_previous(file.parent)}") from None
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= optimizer.keys():
        raise RunFolderError(f"{file} is not an optimiser state; {_previous(file.parent)}")
    return optimizer


def _read_state(file: Path) -> dict[str, Any]:
    try:
        state = json.loads(file.read_text())
        int(state["step"])
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RunFolderError(f"{file} is damaged ({type(err).__name__}: {err}); {_previous(file.parent)}") from None
    return state


def load_checkpoint(run_dir: str | os.PathLike, *, with_optimizer: bool = True, device: str = "cpu") -> Checkpoint:
    """Read the latest complete checkpoint of a run (safetensors / JSON / weights-only torch).

    Reads only: nothing in the run folder is created, renamed or deleted. A damaged file raises
    :class:`RunFolderError` naming it and the previous checkpoint. A checkpoint pruned by a
    running trainer while it was being read is read again from the new ``latest``.
    """
    run_dir = Path(run_dir)
    for attempt in range(3):
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunFolderError(
                f"{run_dir} holds no complete checkpoint (looked in {run_dir / CHECKPOINTS}); "
                f"train it first, or point to another run folder"
            )
        try:
            return _read_checkpoint(ckpt, with_optimizer=with_optimizer, device=device)
        except FileNotFoundError:
            if attempt == 2 or ckpt.is_dir():  # not pruned under us: a file is really missing
                raise RunFolderError(f"{ckpt} is incomplete (a file is missing); {_previous(ckpt)}") from None
    raise AssertionError("unreachable")


def _read_checkpoint(ckpt: Path, *, with_optimizer: bool, device: str) -> Checkpoint:
    model = _read_tensors(ckpt / "model.safetensors", device)
    ema = _read_tensors(ckpt / "ema.safetensors", device) if (ckpt / "ema.safetensors").is_file() else None
    optimizer = None
    if with_optimizer and (ckpt / "optimizer.pt").is_file():
        optimizer = _read_optimizer(ckpt / "optimizer.pt", device)
    rng = _read_tensors(ckpt / "rng.safetensors", "cpu")
    state = _read_state(ckpt / "state.json")
    return Checkpoint(ckpt, model, ema, optimizer, rng, state)


def checkpoint_step(run_dir: str | os.PathLike) -> int | None:
    """The training step of the run's latest complete checkpoint, or None when it has none."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    return int(_read_state(ckpt / "state.json")["step"])
