"""The trainer's state in its run folder: checkpoints written and read, the exported denoiser.

:class:`RunState` is a part of :class:`maskdiff.training.Trainer` (a mix-in: it uses the
trainer's model, EMA, optimiser, streams and counters). Its rules: nothing non-finite is ever
written (weights, EMA, optimiser state and ``pretrained/`` are checked first, on every rank
together), and a checkpoint saved after skipped (non-finite) steps prunes no older one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskdiff.checkpoint import RunFolderError, RunWriteError, load_checkpoint, save_checkpoint
from maskdiff.networks import build_network
from maskdiff.training.distributed import (
    barrier,
    full_model_state,
    full_optimizer_state,
    gather_rng_states,
    restore_sharded,
)
from maskdiff.training.guard import TrainingDiverged, TrainingInterrupted, all_finite

__all__ = ["RunState"]


class RunState:
    """Saving, restoring and exporting a :class:`~maskdiff.training.Trainer` (see the module docstring)."""

    config: Any
    out_dir: Path
    dist: Any
    model: Any
    ema: Any
    optimizer: Any
    streams: Any
    guard: Any
    fsdp: bool
    device: torch.device
    step: int
    tokens_seen: int
    elapsed: float
    _last_saved: int | None
    _device_skip: bool

    def _live_tensors(self) -> list[Any]:
        """What a checkpoint holds: weights, buffers, the EMA and the optimiser state (this rank's shards)."""
        return [*self.model.parameters(), *self.model.buffers(), *(self.ema.shadow if self.ema else []),
                self.optimizer.state]

    def _latest_hint(self) -> str:
        """The end of a divergence message: which checkpoint to go back to, and what to change."""
        lr = f"lower optim.lr (now {self.config.optim.lr:g})"
        if self._last_saved is None:
            return f"; no checkpoint was written: {lr} and start again"
        return (f"; the latest checkpoint is step {self._last_saved} in {self.out_dir / 'checkpoints'}: {lr} and "
                f"continue from it with --resume")

    def _check_guard(self) -> None:
        """Read the non-finite bookkeeping (a host sync); raises TrainingDiverged after too many in a row."""
        new = self.guard.check(self.step, self._latest_hint)
        if new and self._device_skip and self.ema is not None:
            self.ema.num_updates -= new  # skipped on the device, but counted there

    def save(self) -> None:
        """Write a checkpoint (rank 0 writes; every rank takes part in the gathers).

        Nothing non-finite is ever written: non-finite weights, EMA or optimiser state raise
        :class:`TrainingDiverged` instead. After a step was skipped (non-finite) since the
        previous checkpoint, no older checkpoint is pruned to make room for this one.
        """
        self._check_guard()
        if not all_finite(self._live_tensors(), device=self.device, reduce=True):
            raise TrainingDiverged(f"the weights, their average or the optimiser state hold non-finite values at "
                                   f"step {self.step}; nothing was saved{self._latest_hint()}")
        rng = gather_rng_states(self.streams.rng_state(), self.dist)
        if self.fsdp:
            model_state, ema_state = full_model_state(self.model, self.ema, self.dist)
            optim_state = full_optimizer_state(self.model, self.optimizer, self.dist)
        elif self.dist.is_main:
            model_state = self.model.state_dict()
            ema_state = self.ema.state_dict() if self.ema else None
            optim_state = self.optimizer.state_dict()
        keep = self.config.train.keep_checkpoints if self.guard.since_save == 0 else 0
        self.guard.since_save = 0
        self._last_saved = self.step
        if not self.dist.is_main:
            barrier()
            return
        cfg = self.config
        state = {
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed,
            "world_size": self.dist.world_size,
            "grad_accum": cfg.train.grad_accum,
            "ema_updates": self.ema.num_updates if self.ema else 0,
        }
        if self.guard.skipped:
            state["nonfinite_steps"] = self.guard.skipped
        save_checkpoint(
            self.out_dir, self.step,
            model=model_state, ema=ema_state, optimizer=optim_state,
            rng=rng, state=state, keep=keep,
        )
        barrier()

    def _restore(self) -> None:
        """Load the latest checkpoint: weights, EMA, optimiser, RNG streams and counters."""
        if self.fsdp:
            ckpt = restore_sharded(self.out_dir, self.model, self.ema, self.optimizer, self.dist)
        else:
            ckpt = load_checkpoint(self.out_dir, device=str(self.device))
            try:
                self.model.load_state_dict(ckpt.model)
                if self.ema is not None and ckpt.ema is not None:
                    self.ema.load_state_dict(ckpt.ema, ckpt.state["ema_updates"])
                if ckpt.optimizer is not None:
                    self.optimizer.load_state_dict(ckpt.optimizer)
            except (RuntimeError, ValueError, KeyError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise RunFolderError(f"{ckpt.path} does not fit the run's network ({first}); the checkpoint "
                                     f"and network.json disagree") from None
        st = ckpt.state
        if st["world_size"] * st["grad_accum"] != self.streams.n_streams and self.dist.is_main:
            print(
                f"warning: the checkpoint used world_size × grad_accum = {st['world_size']} × {st['grad_accum']}, "
                f"this run {self.dist.world_size} × {self.config.train.grad_accum}: training continues, but not "
                f"on the exact same data order", file=sys.stderr,
            )
        self.streams.load_rng_state(ckpt.rng)
        self.step = int(st["step"])
        self.tokens_seen = int(st["tokens_seen"])
        self.elapsed = float(st.get("elapsed_s", 0.0))
        self.guard.skipped = int(st.get("nonfinite_steps", 0))
        self._last_saved = self.step
        if self.dist.is_main:
            print(f"resumed {self.out_dir} at step {self.step} from {ckpt.path.name}", file=sys.stderr)

    def _save_pretrained(self) -> None:
        """The EMA (or raw) denoiser in ``save_pretrained`` form, written by rank 0 (never non-finite)."""
        if not all_finite(self._live_tensors(), device=self.device, reduce=True):
            raise TrainingDiverged(f"the weights, their average or the optimiser state hold non-finite values at "
                                   f"step {self.step}; pretrained/ was not written{self._latest_hint()}")
        if not self.fsdp:
            if self.dist.is_main:
                with self.averaged_weights() as model:
                    self._write_pretrained(model.network)
            return
        # Sharded: gather full tensors (all ranks), then rank 0 fills an unsharded copy of the
        # network, created on the meta device so that only the gathered tensors take memory.
        state, ema = full_model_state(self.model, self.ema, self.dist)
        if not self.dist.is_main:
            return
        state.update(ema or {})  # the EMA holds every parameter; buffers come from the raw state
        prefix = "network."
        with torch.device("meta"):
            network = build_network(self.model.network.config)
        network.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                strict=True, assign=True)
        self._write_pretrained(network)

    def _write_pretrained(self, network: nn.Module) -> None:
        try:
            network.save_pretrained(self.out_dir / "pretrained")  # type: ignore[operator]
        except OSError as err:
            raise RunWriteError(f"could not write {self.out_dir / 'pretrained'} ({err.strerror}); the checkpoints "
                                f"are intact: free some space and run --resume again to write it") from None

    def _stop(self, total: int) -> None:
        """Ctrl-C was pressed: save this step (unless just saved) and raise TrainingInterrupted."""
        if self._last_saved != self.step:
            self.save()
        raise TrainingInterrupted(
            f"interrupted at step {self.step} of {total}: saved checkpoint step-{self.step:08d} in "
            f"{self.out_dir / 'checkpoints'}; continue with `maskdiff train --out {self.out_dir} --resume`")
