"""The training loop: one recipe for MD4, GenMD4 and the autoregressive baseline.

Shape of a run (``Trainer``): set up (data, model, optimiser, EMA; resume if asked) → train
(steps with gradient accumulation, clipping, LR schedule, EMA, logging, validation,
checkpoints) → save → clean up.

Data and randomness are organised in *streams*: a step consumes ``world_size × grad_accum``
micro-batches, micro-batch k reads only shard k of the training tokens and draws its crops and
its diffusion times/masks from its own two generators. DDP ranks and accumulation steps are
therefore interchangeable: two processes with ``grad_accum=1`` compute the same step as one
process with ``grad_accum=2`` (up to float summation order). Every generator state is
checkpointed, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from maskdiff.checkpoint import (
    environment_info,
    load_checkpoint,
    prepare_run_folder,
    save_checkpoint,
    write_json_atomic,
)
from maskdiff.config import RunConfig
from maskdiff.data import IMAGE_DATASETS, ImageSplits, TokenSplits, load_corpus, load_images, random_crops, shard
from maskdiff.data.images import random_images, shard_images
from maskdiff.ema import EMA
from maskdiff.evaluate import evaluate_images, evaluate_nelbo
from maskdiff.metrics import LN2
from maskdiff.model import MaskedDiffusion, build_model

__all__ = ["Trainer", "train", "learning_rate", "resolve_device", "load_data"]


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device(f"cuda:{local}")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return dev


def load_data(config: RunConfig) -> TokenSplits | ImageSplits:
    """The run's data: a text corpus (token streams) or an image set (fixed-size rows)."""
    if config.data.corpus.lower() in IMAGE_DATASETS:
        data = load_images(config.data.corpus, path=config.data.path)
        if config.data.seq_len != data.seq_len:
            raise ValueError(
                f"{config.data.corpus} images have {data.seq_len} values (H·W·C = {data.shape}); "
                f"set data.seq_len={data.seq_len}"
            )
        return data
    return load_corpus(config.data.corpus, path=config.data.path, cache_dir=config.data.cache_dir)


def _stream_seed(seed: int, stream: int, purpose: int) -> int:
    return (seed * 1_000_003 + stream * 7_919 + purpose * 104_729) % (2**62)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


class Trainer:
    """Train a :class:`RunConfig` into a run folder (see :mod:`maskdiff.checkpoint` for its layout)."""

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
        self.dist = _init_distributed(self.device)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        self.out_dir = Path(out_dir)
        if self.dist.is_main:
            prepare_run_folder(self.out_dir, resume=resume, overwrite=overwrite)
        self._barrier()
        self.progress = progress and self.dist.is_main

        # Data: stream k reads shard k of the training tokens.
        self.data = data if data is not None else load_data(cfg)
        self.vocab_size = self.data.vocab_size
        self.n_streams = self.dist.world_size * cfg.train.grad_accum
        if cfg.train.batch_size % self.n_streams:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} must be divisible by world_size × grad_accum = "
                f"{self.dist.world_size} × {cfg.train.grad_accum}"
            )
        self.micro_batch = cfg.train.batch_size // self.n_streams
        self.my_streams = [self.dist.rank * cfg.train.grad_accum + a for a in range(cfg.train.grad_accum)]
        self.is_image = isinstance(self.data, ImageSplits)
        if self.is_image:
            self.shards = {k: shard_images(self.data.train, self.data.train_labels, k, self.n_streams)
                           for k in self.my_streams}
            for k, (imgs, _) in self.shards.items():
                if len(imgs) == 0:
                    raise ValueError(f"training shard {k} holds no images: use fewer processes × accumulation steps")
        else:
            self.shards = {k: shard(self.data.train, k, self.n_streams) for k in self.my_streams}
            for k, s in self.shards.items():
                if len(s) < cfg.data.seq_len:
                    raise ValueError(f"training shard {k} holds {len(s)} tokens, fewer than data.seq_len={cfg.data.seq_len}")
        self.data_gens = {k: torch.Generator().manual_seed(_stream_seed(cfg.train.seed, k, 1)) for k in self.my_streams}
        self.loss_gens = {
            k: torch.Generator(device=self.device).manual_seed(_stream_seed(cfg.train.seed, k, 2)) for k in self.my_streams
        }

        # Model, optimiser, EMA. Parameters are initialised from the run seed on every rank alike.
        torch.manual_seed(_stream_seed(cfg.train.seed, 0, 0))
        self.model: MaskedDiffusion = build_model(
            cfg, self.vocab_size,
            image_shape=self.data.shape if self.is_image else None,
            num_classes=self.data.num_classes if self.is_image else 0,
        ).to(self.device)
        self.use_labels = self.is_image and cfg.model.class_conditional
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
            weight_decay=cfg.optim.weight_decay, fused=fused,
        )
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        if resume:
            self._restore()
        elif self.dist.is_main:
            write_json_atomic(self.out_dir / "config.json", cfg.to_dict())
            write_json_atomic(self.out_dir / "network.json", self.model.network.config.to_dict())
            write_json_atomic(self.out_dir / "meta.json", {
                **environment_info(), "vocab_size": self.vocab_size, "data": self.data.sizes(),
                **({"image_shape": list(self.data.shape), "num_classes": self.data.num_classes} if self.is_image else {}),
            })
        if cfg.train.compile:
            self.model.network.compile()
        self.ddp = (
            nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.world_size > 1 else None
        )
        self.autocast_dtype = self._autocast_dtype()
        self._tb = self._tensorboard()

    # -- set-up helpers -------------------------------------------------------------------------

    def _autocast_dtype(self) -> torch.dtype | None:
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

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # -- state ----------------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, Tensor]:
        """Generator states of this rank's streams (gathered from every rank on the main one)."""
        local = {f"data.{k}": g.get_state() for k, g in self.data_gens.items()}
        local.update({f"loss.{k}": g.get_state().cpu() for k, g in self.loss_gens.items()})
        local[f"torch_cpu.rank{self.dist.rank}"] = torch.get_rng_state()
        if self.device.type == "cuda":
            local[f"torch_cuda.rank{self.dist.rank}"] = torch.cuda.get_rng_state(self.device)
        if self.dist.world_size == 1:
            return local
        gathered: list[dict[str, Tensor]] = [None] * self.dist.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, local)
        merged: dict[str, Tensor] = {}
        for part in gathered:
            merged.update(part)
        return merged

    def save(self) -> None:
        rng = self._rng_state()
        if not self.dist.is_main:
            self._barrier()
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
            model=self.model.state_dict(),
            ema=self.ema.state_dict() if self.ema else None,
            optimizer=self.optimizer.state_dict(),
            rng=rng, state=state, keep=cfg.train.keep_checkpoints,
        )
        self._barrier()

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.out_dir, device=str(self.device))
        st = ckpt.state
        if st["world_size"] * st["grad_accum"] != self.n_streams:
            print(
                f"warning: the checkpoint used world_size × grad_accum = {st['world_size']} × {st['grad_accum']}, "
                f"this run {self.dist.world_size} × {self.config.train.grad_accum}: training continues, but not "
                f"on the exact same data order", file=sys.stderr,
            )
        self.model.load_state_dict(ckpt.model)
        if self.ema is not None and ckpt.ema is not None:
            self.ema.load_state_dict(ckpt.ema, st["ema_updates"])
        if ckpt.optimizer is not None:
            self.optimizer.load_state_dict(ckpt.optimizer)
        for k in self.my_streams:
            if f"data.{k}" in ckpt.rng:
                self.data_gens[k].set_state(ckpt.rng[f"data.{k}"])
                self.loss_gens[k].set_state(ckpt.rng[f"loss.{k}"].to(self.loss_gens[k].get_state().device))
        cpu_key = f"torch_cpu.rank{self.dist.rank}"
        if cpu_key in ckpt.rng:
            torch.set_rng_state(ckpt.rng[cpu_key])
        cuda_key = f"torch_cuda.rank{self.dist.rank}"
        if cuda_key in ckpt.rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt.rng[cuda_key], self.device)
        self.step = int(st["step"])
        self.tokens_seen = int(st["tokens_seen"])
        self.elapsed = float(st.get("elapsed_s", 0.0))
        if self.dist.is_main:
            print(f"resumed {self.out_dir} at step {self.step} from {ckpt.path.name}", file=sys.stderr)

    # -- logging --------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
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
        for a, k in enumerate(self.my_streams):
            x, labels = self._batch(k)
            sync = self.ddp is None or a == accum - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()  # type: ignore[union-attr]
            with ctx:
                with self._autocast():
                    extra = {"labels": labels} if labels is not None else {}
                    terms = module(x, generator=self.loss_gens[k], **extra)
                (terms["loss"] / accum).backward()
            nelbo_sum += float(terms["nelbo"].detach().mean()) / accum
            loss_sum += float(terms["loss"].detach()) / accum
        if cfg.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([
                p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None])))
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

    def _batch(self, stream: int) -> tuple[Tensor, Tensor | None]:
        """The next micro-batch of a stream: (x (b, L), labels (b,) or None) on the device."""
        cfg = self.config
        if self.is_image:
            images, labels = self.shards[stream]
            x, y = random_images(images, labels, self.micro_batch, self.data_gens[stream])
            return x.to(self.device), (y.to(self.device) if self.use_labels and y is not None else None)
        x = random_crops(self.shards[stream], self.micro_batch, cfg.data.seq_len, self.data_gens[stream])
        return x.to(self.device), None

    def _mean_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.dist.world_size == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.dist.world_size for k, v in zip(keys, t.tolist())}

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[MaskedDiffusion]:
        """The model with EMA weights loaded (raw weights when the EMA is off)."""
        if self.ema is None:
            yield self.model
        else:
            with self.ema.applied(self.model) as m:
                yield m

    def validate(self, max_batches: int | None = None) -> dict[str, float]:
        """Validation bits per token with EMA weights, a fixed seed, split over the ranks."""
        cfg = self.config
        max_chunks = None
        if max_batches:
            max_chunks = max_batches * cfg.train.batch_size // max(1, cfg.train.grad_accum)
        if self.is_image:
            batch = max(1, cfg.train.batch_size // max(1, cfg.train.grad_accum))
            with self.averaged_weights() as model:
                return evaluate_images(
                    model, self.data.validation, self.data.validation_labels if self.use_labels else None,
                    batch_size=batch, max_images=(max_batches * batch) if max_batches else None, seed=cfg.train.seed,
                    device=self.device, autocast_dtype=self.autocast_dtype, rank=self.dist.rank,
                    world_size=self.dist.world_size,
                )
        with self.averaged_weights() as model:
            result = evaluate_nelbo(
                model, self.data.validation, seq_len=cfg.data.seq_len,
                batch_size=max(1, cfg.train.batch_size // max(1, cfg.train.grad_accum)),
                seed=cfg.train.seed, max_chunks=max_chunks, device=self.device,
                autocast_dtype=self.autocast_dtype, rank=self.dist.rank, world_size=self.dist.world_size,
            )
        return result

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
                record = self._mean_across_ranks(record)
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
        if self.dist.is_main:
            with self.averaged_weights() as model:
                model.network.save_pretrained(self.out_dir / "pretrained")
        self._barrier()
        return last_val

    def close(self) -> None:
        """Release the process group safely (DDP model and optimiser first; see gloo note)."""
        if self._tb is not None:
            self._tb.close()
        if dist.is_initialized():
            self.ddp = None
            self.optimizer = None  # type: ignore[assignment]
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


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
