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

Both parallel modes compute the same steps and write the same checkpoints: full, unsharded state
dicts written by rank 0, which load on one process (``maskdiff.load``, ``maskdiff eval``/``sample``)
and resume under either mode or none.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from maskdiff.build import build_model, run_data
from maskdiff.checkpoint import environment_info, load_checkpoint, prepare_run_folder, save_checkpoint
from maskdiff.config import RunConfig
from maskdiff.data import ImageSplits, TokenSplits
from maskdiff.devices import resolve_device
from maskdiff.evaluate import evaluate_split
from maskdiff.fileio import write_json_atomic
from maskdiff.metrics import LN2
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import build_network
from maskdiff.training.distributed import (
    barrier,
    destroy_process_group,
    full_model_state,
    full_optimizer_state,
    gather_rng_states,
    init_distributed,
    mean_across_ranks,
    reshard,
    restore_sharded,
    shard_model,
)
from maskdiff.training.ema import EMA
from maskdiff.training.streams import Streams, model_init_seed

__all__ = ["Trainer", "train", "learning_rate"]


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



class Trainer:
    """Train a :class:`RunConfig` into a run folder (see :mod:`maskdiff.checkpoint` for its layout).

    Args:
        config: the run's settings (validated here).
        out_dir: the run folder.
        resume: continue from the folder's latest checkpoint.
        overwrite: replace an existing run folder.
        progress: show a progress bar (rank 0 only).
        data: the data to train on (default: loaded from ``config.data``).
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
        self.device = resolve_device(cfg.train.device)
        self.dist = init_distributed(self.device)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        self.out_dir = Path(out_dir)
        if self.dist.is_main:
            prepare_run_folder(self.out_dir, resume=resume, overwrite=overwrite)
        barrier()
        self.progress = progress and self.dist.is_main

        # Data: this process's streams (stream k reads shard k of the training data).
        self.data = data if data is not None else run_data(cfg)
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
        self.model: MaskedDiffusion = self._build_model()
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
            weight_decay=cfg.optim.weight_decay, fused=self.device.type == "cuda",
        )
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        if resume:
            self._restore()
            if self.dist.is_main:
                self._record_config_change()
        elif self.dist.is_main:
            self._write_run_files()
        if cfg.train.compile:
            self.model.network.compile()
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = (
            nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
            if self.dist.world_size > 1 and not self.fsdp else None
        )
        self._tb = self._tensorboard()

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

    def _tensorboard(self) -> Any:
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: JSONL only
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    # -- state ----------------------------------------------------------------------------------

    def save(self) -> None:
        """Write a checkpoint (rank 0 writes; every rank takes part in the gathers)."""
        rng = gather_rng_states(self.streams.rng_state(), self.dist)
        if self.fsdp:
            model_state, ema_state = full_model_state(self.model, self.ema, self.dist)
            optim_state = full_optimizer_state(self.model, self.optimizer, self.dist)
        elif self.dist.is_main:
            model_state = self.model.state_dict()
            ema_state = self.ema.state_dict() if self.ema else None
            optim_state = self.optimizer.state_dict()
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
        save_checkpoint(
            self.out_dir, self.step,
            model=model_state, ema=ema_state, optimizer=optim_state,
            rng=rng, state=state, keep=cfg.train.keep_checkpoints,
        )
        barrier()

    def _restore(self) -> None:
        """Load the latest checkpoint: weights, EMA, optimiser, RNG streams and counters."""
        if self.fsdp:
            ckpt = restore_sharded(self.out_dir, self.model, self.ema, self.optimizer, self.dist)
        else:
            ckpt = load_checkpoint(self.out_dir, device=str(self.device))
            self.model.load_state_dict(ckpt.model)
            if self.ema is not None and ckpt.ema is not None:
                self.ema.load_state_dict(ckpt.ema, ckpt.state["ema_updates"])
            if ckpt.optimizer is not None:
                self.optimizer.load_state_dict(ckpt.optimizer)
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
        if self.dist.is_main:
            print(f"resumed {self.out_dir} at step {self.step} from {ckpt.path.name}", file=sys.stderr)

    def _record_config_change(self) -> None:
        """A run resumed with ``--set`` overrides (e.g. more steps): keep config.json true.

        The previous config is kept as ``config.before-step-<N>.json`` and the changed keys are
        printed, so the run folder says what each stretch of training used.
        """
        path = self.out_dir / "config.json"
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = None
        after = self.config.to_dict()
        if before == after:
            return
        changed = sorted(
            f"{section}.{key}"
            for section, values in after.items() if isinstance(values, dict)
            for key in values
            if not isinstance(before, dict) or before.get(section, {}).get(key) != values[key]
        )
        if before is not None:
            write_json_atomic(self.out_dir / f"config.before-step-{self.step}.json", before)
        write_json_atomic(path, after)
        print(f"note: resumed with a changed config ({', '.join(changed) or 'name'}); the previous one is "
              f"kept as config.before-step-{self.step}.json", file=sys.stderr)

    # -- logging --------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` (and TensorBoard when installed); rank 0 only."""
        if not self.dist.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step",):
                    self._tb.add_scalar(f"{split}/{key}", value, record["step"])

    # -- training -------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimiser step over this rank's micro-batches; returns logged scalars (this rank)."""
        cfg = self.config
        module = self.ddp if self.ddp is not None else self.model
        self.model.train()
        lr = learning_rate(self.step, cfg.optim, cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        nelbo_sum = 0.0
        loss_sum = 0.0
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
            nelbo_sum += float(terms["nelbo"].detach().mean()) / accum
            loss_sum += float(terms["loss"].detach()) / accum
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.tokens_seen += cfg.train.batch_size * cfg.data.seq_len
        return {
            "loss": loss_sum,
            "bits_per_token": nelbo_sum / (cfg.data.seq_len * LN2),
            "grad_norm": grad_norm,
            "lr": lr,
        }

    def _clip_gradients(self) -> float:
        """Clip to ``optim.grad_clip`` (when > 0); returns the global gradient norm before clipping."""
        cfg = self.config
        if self.fsdp:
            from torch.distributed.tensor import DTensor

            # Norms of sharded gradients are DTensors; the global norm comes back replicated.
            params = list(self.model.parameters())
            if cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        if cfg.optim.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip))
        return float(torch.linalg.vector_norm(torch.stack([
            p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None])))

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
        """Train until ``train.steps``; returns the final validation figures."""
        cfg = self.config
        total = cfg.train.steps
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        window: dict[str, float] = {}
        window_steps = 0
        window_start = time.perf_counter()
        last_val: dict[str, Any] = {}
        while self.step < total:
            t0 = time.perf_counter()
            scalars = self.train_step()
            self.elapsed += time.perf_counter() - t0
            for key, value in scalars.items():
                window[key] = window.get(key, 0.0) + value
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if self.step % cfg.train.log_every == 0 or self.step == total:
                seconds = time.perf_counter() - window_start
                record = {k: v / window_steps for k, v in window.items()}
                record = mean_across_ranks(record, self.dist, self.device)
                record["tokens_per_s"] = window_steps * cfg.train.batch_size * cfg.data.seq_len / max(seconds, 1e-9)
                record.update(self.model.schedule_stats())
                self.log({"step": self.step, "split": "train", "tokens": self.tokens_seen, **record})
                if bar is not None:
                    bar.set_postfix(bpt=f"{record['bits_per_token']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    **({"w": f"{record['w_mean']:.2f}"} if "w_mean" in record else {}))
                window, window_steps, window_start = {}, 0, time.perf_counter()
            if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or self.step == total):
                val = self.validate(cfg.train.eval_batches or None)
                last_val = val
                self.log({"step": self.step, "split": "validation", "bits_per_token": val["bits_per_token"],
                          "stderr": val["stderr"], "n_sequences": val["n_sequences"]})
                if bar is not None:
                    bar.write(f"step {self.step}: validation {val['bits_per_token']:.4f} ± {val['stderr']:.4f} bits/token")
            if (cfg.train.save_every and self.step % cfg.train.save_every == 0) or self.step == total:
                self.save()
        if bar is not None:
            bar.close()
        self._save_pretrained()
        barrier()
        return last_val

    def _save_pretrained(self) -> None:
        """The EMA (or raw) denoiser in ``save_pretrained`` form, written by rank 0."""
        if not self.fsdp:
            if self.dist.is_main:
                with self.averaged_weights() as model:
                    model.network.save_pretrained(self.out_dir / "pretrained")
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
        network.save_pretrained(self.out_dir / "pretrained")

    def close(self) -> None:
        """Release the process group safely: drop everything that holds communication state
        first (DDP wrapper, or the sharded model, EMA and optimiser under FSDP; with gloo a
        process group destroyed under live users sometimes crashes), then barrier, destroy."""
        if self._tb is not None:
            self._tb.close()
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
