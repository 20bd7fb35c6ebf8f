"""The training loop: one recipe for MD4, GenMD4 and the autoregressive baseline.

Shape of a run (:class:`Trainer`): set up (data streams, model, optimiser, EMA; resume if asked)
→ train (steps with gradient accumulation, clipping, LR schedule, EMA, logging, validation,
checkpoints) → save → clean up.

The trainer composes three parts:

* :mod:`maskdiff.training.streams`: a step consumes ``world_size × grad_accum`` micro-batches;
  micro-batch k reads only shard k of the training data and draws its crops and its diffusion
  times/masks from its own two generators. DDP ranks and accumulation steps are therefore
  interchangeable (two processes with ``grad_accum=1`` compute the same step as one process with
  ``grad_accum=2``, up to float summation order), and a resumed run continues bit for bit.
* :mod:`maskdiff.training.distributed`: data parallelism under ``torchrun``, ``train.parallel``
  = ``ddp`` (default: whole model on every process, gradients all-reduced) or ``fsdp`` (FSDP2:
  parameters, gradients, AdamW moments and the EMA sharded over the processes, for models whose
  weights and optimiser state do not fit one device).
* :mod:`maskdiff.training.ema`: the exponential moving average that validation, checkpoints and
  the exported denoiser use.
* :mod:`maskdiff.training.guard`: steps with a non-finite loss or gradient norm are skipped and
  counted (``train.max_nonfinite_steps`` in a row stop the run: :class:`TrainingDiverged`), and
  Ctrl-C saves a checkpoint before stopping (:class:`TrainingInterrupted`).
* :mod:`maskdiff.training.resume` (the folder and the flags checked, and locked, before any
  work), :mod:`maskdiff.training.checkpointing` (save, restore, ``pretrained/``: nothing
  non-finite is written) and :mod:`maskdiff.training.logbook` (``metrics.jsonl``).

Both parallel modes compute the same steps and write the same checkpoints: full, unsharded state
dicts written by rank 0, which load on one process (``maskdiff.load``, ``maskdiff eval``/``sample``)
and resume under either mode or none.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from maskdiff.build import build_model, network_config_for, run_data
from maskdiff.checkpoint import environment_info
from maskdiff.config import RunConfig
from maskdiff.data import ImageSplits, TokenSplits
from maskdiff.devices import resolve_device
from maskdiff.evaluate import evaluate_split
from maskdiff.fileio import write_json_atomic
from maskdiff.metrics import LN2
from maskdiff.model import MaskedDiffusion
from maskdiff.training.checkpointing import RunState
from maskdiff.training.distributed import (
    barrier,
    destroy_process_group,
    init_distributed,
    mean_across_ranks,
    on_main,
    reshard,
    shard_model,
)
from maskdiff.training.ema import EMA
from maskdiff.training.guard import (
    NonFiniteGuard,
    StopRequest,
    TrainingDiverged,
    TrainingInterrupted,
    max_nonfinite_steps,
)
from maskdiff.training.logbook import Logbook
from maskdiff.training.resume import check_network, open_run, release_run, tidy_resumed
from maskdiff.training.streams import Streams, model_init_seed

__all__ = ["Trainer", "train", "learning_rate", "TrainingDiverged", "TrainingInterrupted"]


def learning_rate(step: int, cfg: Any, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``lr · min_lr_ratio`` (or constant).

    ``step`` counts completed optimiser steps (0 for the first update).
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))



class Trainer(RunState):
    """Train a :class:`RunConfig` into a run folder (see :mod:`maskdiff.checkpoint` for its layout).

    Args:
        config: the run's settings (validated here).
        out_dir: the run folder.
        resume: continue from the folder's latest checkpoint (same architecture, more steps).
        overwrite: move an existing run folder aside (``PATH.old-<time>``) and start afresh.
        progress: show a progress bar (rank 0 only).
        data: the data to train on (default: loaded from ``config.data``).

    The folder is locked for the trainer's life (:meth:`close` releases it).

    Raises:
        RunFolderError: the folder and the flags do not fit (checked before anything is written).
        FolderLockedError: another process is writing the folder.
    """

    def __init__(
        self,
        config: RunConfig,
        out_dir: str | os.PathLike,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        data: TokenSplits | ImageSplits | None = None,
    ) -> None:
        self.config = config.validate()
        cfg = self.config
        self.max_nonfinite = max_nonfinite_steps(cfg.train)
        self.device = resolve_device(cfg.train.device)
        self.dist = init_distributed(self.device)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        self.out_dir = Path(out_dir)
        self.progress = progress and self.dist.is_main
        # Every check of the folder and the flags runs before anything is written; then the
        # folder is locked (one writer) until close(). A failed set-up releases it again.
        self._lock = on_main(lambda: open_run(self.out_dir, cfg, resume=resume, overwrite=overwrite), self.dist)
        try:
            self._set_up(resume, data)
        except BaseException:
            release_run(self._lock, failed=True)
            self._lock = None
            raise

    def _set_up(self, resume: bool, data: TokenSplits | ImageSplits | None) -> None:
        """Data streams, model, EMA, optimiser; the checkpoint when resuming, the run files when not."""
        cfg = self.config
        # Data: this process's streams (stream k reads shard k of the training data).
        # A resumed run encodes its data with the tokenizer its folder keeps (data.corpus=files).
        if data is None:
            data = run_data(cfg, self.out_dir) if resume else run_data(cfg)
        self.data = data
        self.vocab_size = self.data.vocab_size
        self.use_labels = cfg.model.class_conditional and self.data.num_classes > 0
        self.streams = Streams(
            self.data, seed=cfg.train.seed, rank=self.dist.rank, world_size=self.dist.world_size,
            grad_accum=cfg.train.grad_accum, batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len,
            device=self.device, use_labels=self.use_labels,
        )

        # Model, optimiser, EMA. With FSDP the model is sharded first: the EMA and the optimiser
        # must hold the shards (DTensors), not the full parameters that fully_shard replaces.
        self.fsdp = self.dist.world_size > 1 and cfg.train.parallel == "fsdp"
        self.autocast_dtype = self._autocast_dtype()
        if resume:  # the network.json of the run against what this config and data build
            net_cfg = network_config_for(cfg, self.vocab_size, image_shape=self.data.image_shape,
                                         num_classes=self.data.num_classes)
            on_main(lambda: check_network(self.out_dir, net_cfg), self.dist)
        self.model: MaskedDiffusion = self._build_model()
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
            weight_decay=cfg.optim.weight_decay, fused=self.device.type == "cuda",
        )
        # A step with a non-finite loss or gradient is skipped on the device when the optimiser
        # can take the flag there (fused AdamW), else after reading it (see training/guard.py).
        self._device_skip = (not self.fsdp and isinstance(self.optimizer, torch.optim.Adam)
                             and bool(self.optimizer.defaults.get("fused")))
        self.guard = NonFiniteGuard(self.max_nonfinite, self.device)
        self._last_saved: int | None = None
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        if resume:
            self._restore()
            if self.dist.is_main:
                tidy_resumed(self.out_dir, cfg, self.step)
        elif self.dist.is_main:
            self._write_run_files()
        if cfg.train.compile:
            self.model.network.compile()
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = (
            nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
            if self.dist.world_size > 1 and not self.fsdp else None
        )
        self.logbook = Logbook(self.out_dir, enabled=self.dist.is_main)

    # -- set-up helpers -------------------------------------------------------------------------

    def _build_model(self) -> MaskedDiffusion:
        """The model, initialised from the run seed alike on every rank; sharded (FSDP) or on the device.

        Under FSDP it is built on the CPU and moved to the device one sharded unit at a time, so
        no device ever holds all of it.
        """
        cfg = self.config
        torch.manual_seed(model_init_seed(cfg.train.seed))
        model = build_model(cfg, self.vocab_size, image_shape=self.data.image_shape, num_classes=self.data.num_classes)
        if self.fsdp:
            return shard_model(model, self.device, self.dist.world_size, self.autocast_dtype)
        return model.to(self.device)

    def _write_run_files(self) -> None:
        """``config.json``, ``network.json`` and ``meta.json`` of a new run (rank 0)."""
        write_json_atomic(self.out_dir / "config.json", self.config.to_dict())
        write_json_atomic(self.out_dir / "network.json", self.model.network.config.to_dict())
        write_json_atomic(self.out_dir / "meta.json", {
            **environment_info(), "vocab_size": self.vocab_size, "data": self.data.sizes(), **self.data.meta(),
        })
        for name, content in getattr(self.data, "run_files", dict)().items():  # e.g. the tokenizer of own files
            write_json_atomic(self.out_dir / name, content)

    def _autocast_dtype(self) -> torch.dtype | None:
        """bf16 unless ``train.dtype`` is fp32 (or ``auto`` off CUDA)."""
        want = self.config.train.dtype
        if want == "fp32" or (want == "auto" and self.device.type != "cuda"):
            return None
        return torch.bfloat16

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- logging --------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` (one write; and TensorBoard when installed); rank 0 only."""
        self.logbook.write(record)

    def _log_window(self, bar: Any, stopped: str | None = None) -> None:
        """The train record of the steps since the last one: means over the finite steps, the
        number skipped (``nonfinite_steps``, when any), throughput and schedule statistics."""
        book = self.logbook
        if book.steps == 0:
            return
        cfg = self.config
        seconds = time.perf_counter() - book.start
        record = mean_across_ranks(book.means(), self.dist, self.device)
        record["tokens_per_s"] = book.steps * cfg.train.batch_size * cfg.data.seq_len / max(seconds, 1e-9)
        record.update(self.model.schedule_stats())
        if self.guard.window:
            record.update(nonfinite_steps=self.guard.window, nonfinite_total=self.guard.skipped)
            self.guard.window = 0
        if stopped:
            record["stopped"] = stopped
        self.log({"step": self.step, "split": "train", "tokens": self.tokens_seen, **record})
        if bar is not None:
            bar.set_postfix(bpt=f"{record['bits_per_token']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **({"w": f"{record['w_mean']:.2f}"} if "w_mean" in record else {}))
        book.reset()

    # -- training -------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimiser step over this rank's micro-batches.

        Returns this rank's scalars, as 0-d device tensors (no host sync) but ``lr``, and
        ``nonfinite``: whether the step was skipped (no optimiser or EMA update) because its loss
        or gradient norm is not finite (see :mod:`maskdiff.training.guard`).
        """
        cfg = self.config
        module = self.ddp if self.ddp is not None else self.model
        self.model.train()
        lr = learning_rate(self.step, cfg.optim, cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        nelbo_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        accum = cfg.train.grad_accum
        for a, k in enumerate(self.streams.mine):
            x, labels = self.streams.next_batch(k)
            if self.fsdp:
                # Reduce-scatter gradients only after the last micro-batch (DDP's no_sync);
                # until then each rank accumulates unsharded gradients locally.
                self.model.set_requires_gradient_sync(a == accum - 1)  # type: ignore[operator]
                ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
            else:
                sync = self.ddp is None or a == accum - 1
                ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()  # type: ignore[union-attr]
            with ctx:
                with self._autocast():
                    extra = {"labels": labels} if labels is not None else {}
                    terms = module(x, generator=self.streams.loss_generator(k), **extra)
                (terms["loss"] / accum).backward()
            nelbo_sum += terms["nelbo"].detach().mean().double() / accum
            loss_sum += terms["loss"].detach().double() / accum
        grad_norm = self._clip_gradients()
        bad = self.guard.flag(loss_sum, grad_norm)
        self._apply_update(bad)
        self.guard.observe(bad)
        self.step += 1
        self.tokens_seen += cfg.train.batch_size * cfg.data.seq_len
        return {
            "loss": loss_sum,
            "bits_per_token": nelbo_sum / (cfg.data.seq_len * LN2),
            "grad_norm": grad_norm,
            "lr": lr,
            "nonfinite": bad,
        }

    def _apply_update(self, bad: Tensor) -> None:
        """Optimiser step and EMA update, unless ``bad`` (a 0-d bool tensor on the device)."""
        if self._device_skip:
            # Fused AdamW reads the flag on the device and then leaves weights, moments and step
            # counts as they were (the gradient scaler's mechanism): no host sync per step.
            self.optimizer.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
            if self.ema is not None:
                self.ema.update(self.model, skip=bad)
        elif not bool(bad):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)

    def _clip_gradients(self) -> Tensor:
        """Clip to ``optim.grad_clip`` (when > 0); returns the global gradient norm before
        clipping, as a 0-d tensor on the device."""
        cfg = self.config
        if self.fsdp:
            from torch.distributed.tensor import DTensor

            # Norms of sharded gradients are DTensors; the global norm comes back replicated.
            params = list(self.model.parameters())
            if cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            return norm.full_tensor() if isinstance(norm, DTensor) else norm
        if cfg.optim.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        return torch.linalg.vector_norm(torch.stack([
            p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None]))

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[MaskedDiffusion]:
        """The model with EMA weights loaded (raw weights when the EMA is off).

        Under FSDP the model is sharded: forward passes inside are collectives (every rank must
        make the same calls), and the EMA is swapped in shard by shard.
        """
        if self.ema is None:
            try:
                yield self.model
            finally:
                reshard(self.model, fsdp=self.fsdp)
        else:
            with self.ema.applied(self.model) as m:
                try:
                    yield m
                finally:
                    # Before the raw weights are copied back: they must go into the shards.
                    reshard(self.model, fsdp=self.fsdp)

    def validate(self, max_batches: int | None = None) -> dict[str, float]:
        """Validation bits per token with EMA weights, a fixed seed, split over the ranks.

        Batches of ``batch_size / grad_accum`` sequences (or images), dealt out to the ranks in
        turn; at most ``max_batches`` of them (None or 0: the whole split).
        """
        cfg = self.config
        batch = max(1, cfg.train.batch_size // max(1, cfg.train.grad_accum))
        with self.averaged_weights() as model:
            return evaluate_split(
                model, self.data, "validation", batch_size=batch, max_n=max_batches * batch if max_batches else None,
                seed=cfg.train.seed, device=self.device, autocast_dtype=self.autocast_dtype, seq_len=cfg.data.seq_len,
                rank=self.dist.rank, world_size=self.dist.world_size,
            )

    def fit(self) -> dict[str, Any]:
        """Train until ``train.steps``; returns the final validation figures.

        Raises:
            TrainingDiverged: ``train.max_nonfinite_steps`` steps in a row had a non-finite loss
                or gradient norm (each was skipped), or the weights became non-finite; nothing
                non-finite was written, and no good checkpoint was pruned.
            TrainingInterrupted: Ctrl-C; the first one saves a checkpoint of the current step
                first, the message says which step to resume from.
        """
        cfg = self.config
        total = cfg.train.steps
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        last_val: dict[str, Any] = {}
        self.logbook.reset()
        with StopRequest(self.dist.world_size == 1) as stop:
            try:
                while self.step < total:
                    t0 = time.perf_counter()
                    self.logbook.add(self.train_step())
                    self.elapsed += time.perf_counter() - t0
                    if bar is not None:
                        bar.update(1)
                    logging = self.step % cfg.train.log_every == 0 or self.step == total
                    if logging or not self._device_skip:
                        self._check_guard()
                    if logging:
                        self._log_window(bar)
                    if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or self.step == total):
                        last_val = self._validate_and_log(bar)
                    if (cfg.train.save_every and self.step % cfg.train.save_every == 0) or self.step == total:
                        self._check_guard()
                        if not self.guard.streak or self.step == total:  # not amid skipped steps
                            self.save()
                    if stop.requested:
                        self._stop(total)
            except TrainingDiverged:
                self._log_window(None, stopped="diverged")
                raise
            except KeyboardInterrupt:
                saved = (f"the latest checkpoint is step {self._last_saved}: continue from it with `maskdiff train "
                         f"--out {self.out_dir} --resume`" if self._last_saved is not None
                         else "no checkpoint was written")
                raise TrainingInterrupted(f"interrupted at step {self.step} of {total} without saving; {saved}") from None
            finally:
                if bar is not None:
                    bar.close()
        self._save_pretrained()
        barrier()
        if self.guard.skipped and self.dist.is_main:
            print(f"warning: {self.guard.skipped} step(s) had a non-finite loss or gradient norm and were skipped "
                  f"(nonfinite_steps in {self.out_dir / 'metrics.jsonl'})", file=sys.stderr)
        return last_val

    def _validate_and_log(self, bar: Any) -> dict[str, Any]:
        cfg = self.config
        val = self.validate(cfg.train.eval_batches or None)
        self.log({"step": self.step, "split": "validation", "bits_per_token": val["bits_per_token"],
                  "stderr": val["stderr"], "n_sequences": val["n_sequences"]})
        if bar is not None:
            bar.write(f"step {self.step}: validation {val['bits_per_token']:.4f} ± {val['stderr']:.4f} bits/token")
        return val

    def close(self) -> None:
        """Release the process group safely: drop everything that holds communication state
        first (DDP wrapper, or the sharded model, EMA and optimiser under FSDP; with gloo a
        process group destroyed under live users sometimes crashes), then barrier, destroy."""
        if getattr(self, "logbook", None) is not None:
            self.logbook.close()
        release_run(self._lock, failed=False)
        self._lock = None
        if dist.is_initialized():
            self.ddp = None
            self.optimizer = None  # type: ignore[assignment]
            if self.fsdp:
                self.model = None  # type: ignore[assignment]
                self.ema = None
            destroy_process_group()


def train(
    config: RunConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``config`` into ``out_dir``; returns the final validation figures."""
    trainer = Trainer(config, out_dir, resume=resume, overwrite=overwrite, progress=progress)
    try:
        return trainer.fit()
    finally:
        trainer.close()
