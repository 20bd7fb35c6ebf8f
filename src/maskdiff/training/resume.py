"""Opening a run folder for training, with every check that can run before the work.

:func:`open_run` is the trainer's entry into its folder (rank 0): the flags against the folder
(:func:`maskdiff.checkpoint.open_run_folder`: new, ``--overwrite``, ``--resume``, read-only, the
lock), then for ``--resume`` the checks of :func:`check_resume` (steps done, architecture).
:func:`check_network` compares ``network.json`` with the network a resumed config would build,
once the data (and so the vocabulary) is known. Nothing in the folder changes before all of them
pass; after the restore, :func:`tidy_resumed` records a changed config
(:func:`record_config_change`), repairs a torn last line of ``metrics.jsonl`` and removes a
killed writer's temporary checkpoint folders.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from maskdiff.checkpoint import RunFolderError, checkpoint_step, clean_stale_checkpoints, open_run_folder
from maskdiff.config import RunConfig, config_from_dict
from maskdiff.fileio import LOCK_NAME, FolderLock, read_json, repair_last_line, write_json_atomic
from maskdiff.networks import WEIGHTS_NAME
from maskdiff.runs import read_run_config

__all__ = [
    "open_run", "release_run", "tidy_resumed", "check_resume", "check_network", "record_config_change",
    "ARCHITECTURE_KEYS",
]

# Config keys that fix the network's tensors (its architecture): a resumed run may not change them.
ARCHITECTURE_KEYS = ("data.seq_len", "diffusion.method") + tuple(
    f"model.{k}" for k in ("architecture", "n_layers", "d_model", "n_heads", "mlp_ratio", "time_conditioning",
                           "causal", "class_conditional", "unet_channel_mult", "unet_res_blocks",
                           "unet_attention_layers"))
# network.json fields that may differ from the resumed config's without changing any tensor
# (head_init only chose the starting values, which the checkpoint replaces).
_FREE_NETWORK_FIELDS = ("dropout", "head_init")


def open_run(out_dir: Path, config: RunConfig, *, resume: bool, overwrite: bool) -> FolderLock:
    """Check, create or move aside, and lock the run folder; for ``resume`` also :func:`check_resume`.

    Returns the folder's lock (release it when done). A new folder that set-up created and left
    empty is removed again by :func:`release_run`.
    """
    created = not out_dir.exists()
    lock = open_run_folder(out_dir, resume=resume, overwrite=overwrite)
    lock.created = created  # type: ignore[attr-defined]
    try:
        if resume:
            check_resume(out_dir, config)
    except BaseException:
        lock.release()
        raise
    return lock


def tidy_resumed(out_dir: Path, config: RunConfig, step: int) -> None:
    """After a successful restore (rank 0, holding the lock): record a changed config, cut a torn
    last line off ``metrics.jsonl``, remove a killed writer's temporary checkpoint folders."""
    record_config_change(out_dir, config, step)
    removed = repair_last_line(out_dir / "metrics.jsonl")
    if removed:
        print(f"note: cut a torn last line ({removed} bytes, from a run killed while logging) off "
              f"{out_dir / 'metrics.jsonl'}", file=sys.stderr)
    clean_stale_checkpoints(out_dir)


def release_run(lock: FolderLock | None, *, failed: bool) -> None:
    """Release the run's lock; after a failed set-up, remove the folder if this run created it
    and it is still empty."""
    if lock is None:
        return
    folder = lock.folder
    lock.release()
    if failed and getattr(lock, "created", False):
        with contextlib.suppress(OSError):
            if not any(p.name != LOCK_NAME for p in folder.iterdir()):
                folder.rmdir()


def _differences(before: dict[str, Any], after: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    out = []
    for key in keys:
        section, name = key.split(".")
        old, new = before.get(section, {}).get(name), after.get(section, {}).get(name)
        if old != new:
            out.append(f"{key} {old!r} → {new!r}")
    return out


def check_resume(out_dir: Path, config: RunConfig) -> int:
    """Before resuming: the run has a checkpoint, keeps its architecture and asks for more steps.

    Returns the step of the latest checkpoint.

    Raises:
        RunFolderError: one line naming what is wrong and the fix; nothing in the folder changed.
    """
    saved = read_run_config(out_dir)
    step = checkpoint_step(out_dir)
    if step is None:
        raise RunFolderError(f"cannot resume: {out_dir} holds no complete checkpoint yet; start it afresh with "
                             f"--overwrite (the folder is kept as {out_dir}.old-<time>)")
    changed = _differences(saved.to_dict(), config.to_dict(), ARCHITECTURE_KEYS)
    if changed:
        raise RunFolderError(
            f"cannot resume {out_dir} with another architecture ({'; '.join(changed)}): the network of a run is "
            f"fixed when it starts; drop these --set overrides, or train a new run with another --out")
    steps = config.train.steps
    finished = (out_dir / "pretrained" / WEIGHTS_NAME).is_file()  # else: resuming writes pretrained/ only
    if steps < step or (steps == step and finished):
        ask = "fewer" if steps < step else "no more"
        raise RunFolderError(
            f"cannot resume {out_dir}: it has trained {step} steps and train.steps={steps} asks for {ask}; "
            f"pass --set train.steps=N with N > {step} to train on (nothing was changed)")
    return step


def check_network(out_dir: Path, network_config: Any) -> None:
    """A resumed run builds the network of its ``network.json``: one line naming the fields that differ.

    Raises:
        RunFolderError: the data or the config would build another network (e.g. another vocabulary).
    """
    file = out_dir / "network.json"
    stored = read_json(file)
    if not isinstance(stored, dict):
        raise RunFolderError(f"{file} is missing or not a JSON object; it should hold the run's network config")
    try:
        stored = type(network_config).from_dict(stored).to_dict()  # the saved fields, defaults filled in
    except (TypeError, ValueError, KeyError) as err:
        raise RunFolderError(f"{file} is not a valid {type(network_config).__name__} ({err})") from None
    new = network_config.to_dict()
    changed = [f"{k} {stored.get(k)!r} → {new.get(k)!r}" for k in sorted(set(stored) | set(new))
               if stored.get(k) != new.get(k) and k not in _FREE_NETWORK_FIELDS]
    if changed:
        raise RunFolderError(
            f"cannot resume {out_dir}: its network ({file}) differs from the one this config and data would build "
            f"({'; '.join(changed)}); resume with the run's own data and config, or train a new run")


def record_config_change(out_dir: Path, config: RunConfig, step: int) -> None:
    """A run resumed with ``--set`` overrides (e.g. more steps): keep config.json true.

    The previous config is kept as ``config.before-step-<N>.json`` and the changed keys are
    printed, so the run folder says what each stretch of training used. Keys that the stored
    config lacks (written by an older version) count as changed only when they differ from their
    default.
    """
    path = out_dir / "config.json"
    before = read_json(path)
    after = config.to_dict()
    try:
        normalised = config_from_dict(before).to_dict() if isinstance(before, dict) else None
    except (TypeError, ValueError):
        normalised = None
    if normalised == after:
        return
    changed = sorted(
        f"{section}.{key}"
        for section, values in after.items() if isinstance(values, dict)
        for key in values
        if not isinstance(normalised, dict) or normalised.get(section, {}).get(key) != values[key]
    )
    if before is not None:
        write_json_atomic(out_dir / f"config.before-step-{step}.json", before)
    write_json_atomic(path, after)
    print(f"note: resumed with a changed config ({', '.join(changed) or 'name'}); the previous one is "
          f"kept as config.before-step-{step}.json", file=sys.stderr)
