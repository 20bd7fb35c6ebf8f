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

Data parallelism under ``torchrun`` (``WORLD_SIZE > 1``; rendezvous, ranks and devices come from
torchrun's environment, so the same command works on one node or many) has two modes,
``train.parallel``:

* ``ddp`` (default): every process holds the whole model, optimiser state and EMA; gradients are
  all-reduced (``DistributedDataParallel``).
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each transformer block and then on
  the whole :class:`MaskedDiffusion`. Parameters, gradients, AdamW moments and the EMA are
  sharded over the processes (each holds ~1/world of them); a block's parameters are gathered
  only while it runs. For models whose weights and optimiser state do not fit one device. On CUDA
  with bf16 the gathered parameters are bf16 and gradients are reduced in float32; the sharded
  master weights stay float32. The model is built (from the run seed, identically on every
  process) on the CPU and moved to the device one sharded unit at a time, so no device ever
  holds all of it.

Both modes compute the same steps and write the same checkpoints: full, unsharded state dicts
written by rank 0, which load on one process (``maskdiff.load``, ``maskdiff eval``/``sample``)
and resume under either mode or none.
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

import torch
import torch.distributed as dist
from torch import Tensor, nn

from maskdiff.checkpoint import (
    Checkpoint,
    environment_info,
    load_checkpoint,
    prepare_run_folder,
    save_checkpoint,
)
from maskdiff.config import RunConfig
from maskdiff.build import build_model, run_data
from maskdiff.data import ImageSplits, TokenSplits, random_crops, shard
from maskdiff.data.images import random_images, shard_images
from maskdiff.training.ema import EMA
from maskdiff.evaluate import evaluate_images, evaluate_nelbo
from maskdiff.metrics import LN2
from maskdiff.devices import resolve_device
from maskdiff.fileio import write_json_atomic
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import build_network

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
        self.data = data if data is not None else run_data(cfg)
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
        # With FSDP the model is sharded first: the EMA and the optimiser must hold the shards
        # (DTensors), not the full parameters that fully_shard replaces.
        self.fsdp = self.dist.world_size > 1 and cfg.train.parallel == "fsdp"
        self.autocast_dtype = self._autocast_dtype()
        torch.manual_seed(_stream_seed(cfg.train.seed, 0, 0))
        model = build_model(
            cfg, self.vocab_size,
            image_shape=self.data.shape if self.is_image else None,
            num_classes=self.data.num_classes if self.is_image else 0,
        )
        self.model: MaskedDiffusion = self._shard(model) if self.fsdp else model.to(self.device)
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
            if self.dist.is_main:
                self._record_config_change()
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
            if self.dist.world_size > 1 and not self.fsdp else None
        )
        self._tb = self._tensorboard()

    # -- set-up helpers -------------------------------------------------------------------------

    def _shard(self, model: MaskedDiffusion) -> MaskedDiffusion:
        """FSDP2: shard each block (``network.shard_units()``), then the root (embeddings, head, schedule, rest).

        Per-block units let a block's parameters be gathered just before it runs and freed after,
        so peak memory is the shards plus about one full block. The root unit makes the model
        itself the module the trainer calls (``fully_shard`` changes its class in place). The
        mesh spans all processes (one dimension: pure data-parallel sharding); it is built from
        the process group torchrun set up, on one node or many.
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.dist.world_size,))
        if self.device.type == "cuda" and self.autocast_dtype == torch.bfloat16:
            # Gathered parameters in bf16 for compute, gradients reduced in float32; the sharded
            # parameters the optimiser updates stay float32.
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()  # float32 throughout (CPU, or train.dtype=fp32)
        for block in model.network.shard_units():
            fully_shard(block, mesh=mesh, mp_policy=mp)
        # The model is still on the CPU here; fully_shard moves only this process's shards to
        # the mesh's device.
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model

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

    def _state_options(self, **kwargs: bool) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kwargs)

    def _full_model_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """(model, EMA) state of the sharded model as full CPU tensors, on rank 0 only.

        These are gathers, so every rank must call this; the other ranks get empty dicts.
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        # cpu_offload: the full tensors land in rank 0's host memory, nowhere else.
        model = get_model_state_dict(self.model, options=self._state_options(cpu_offload=True))
        ema = self.ema.full_state_dict(keep=self.dist.is_main) if self.ema else None
        return (model, ema) if self.dist.is_main else ({}, None)

    def _full_optimizer_state(self) -> dict[str, Any]:
        """AdamW state of the sharded model, full and in ``optimizer.state_dict()`` layout, on
        rank 0 only (every rank must call this).

        It comes back keyed by parameter name and is re-keyed by position, the layout DDP and
        single-process runs write, so that any run can resume it.
        """
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optim = get_optimizer_state_dict(self.model, self.optimizer, options=self._state_options(cpu_offload=True))
        if not self.dist.is_main:
            return {}
        position = {name: i for i, name in enumerate(self._param_names())}
        return {
            "state": {position[name]: value for name, value in optim["state"].items()},
            "param_groups": [{**g, "params": [position[name] for name in g["params"]]} for g in optim["param_groups"]],
        }

    def _param_names(self) -> list[str]:
        """Parameter names in the optimiser's order (it was built from ``model.parameters()``)."""
        return [name for name, _ in self.model.named_parameters()]

    def save(self) -> None:
        """Write a checkpoint (rank 0 writes; every rank takes part in the gathers)."""
        rng = self._rng_state()
        if self.fsdp:
            model_state, ema_state = self._full_model_state()
            optim_state = self._full_optimizer_state()
        elif self.dist.is_main:
            model_state = self.model.state_dict()
            ema_state = self.ema.state_dict() if self.ema else None
            optim_state = self.optimizer.state_dict()
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
            model=model_state, ema=ema_state, optimizer=optim_state,
            rng=rng, state=state, keep=cfg.train.keep_checkpoints,
        )
        self._barrier()

    def _restore(self) -> None:
        if self.fsdp:
            ckpt = self._restore_sharded()
        else:
            ckpt = load_checkpoint(self.out_dir, device=str(self.device))
            self.model.load_state_dict(ckpt.model)
            if self.ema is not None and ckpt.ema is not None:
                self.ema.load_state_dict(ckpt.ema, ckpt.state["ema_updates"])
            if ckpt.optimizer is not None:
                self.optimizer.load_state_dict(ckpt.optimizer)
        st = ckpt.state
        if st["world_size"] * st["grad_accum"] != self.n_streams and self.dist.is_main:
            print(
                f"warning: the checkpoint used world_size × grad_accum = {st['world_size']} × {st['grad_accum']}, "
                f"this run {self.dist.world_size} × {self.config.train.grad_accum}: training continues, but not "
                f"on the exact same data order", file=sys.stderr,
            )
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

    def _restore_sharded(self) -> Checkpoint:
        """Load the latest (full) checkpoint into the sharded model, EMA and optimiser.

        Only rank 0 reads the files (into host memory); the tensors are scattered from it
        (``broadcast_from_rank0``), and the small parts (step counters, RNG streams) are sent as
        objects, so the other ranks never hold a full copy and need not see the run folder.
        Returns the checkpoint with its tensors on rank 0 only (``state`` and ``rng`` on all).
        """
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        ckpt: Checkpoint | None = None
        header: list[Any] = [None]
        if self.dist.is_main:
            try:
                ckpt = load_checkpoint(self.out_dir, device="cpu")
                missing = self.ema.missing(ckpt.ema) if self.ema is not None and ckpt.ema is not None else []
                header[0] = {"path": str(ckpt.path), "state": ckpt.state, "rng": ckpt.rng,
                             "ema": ckpt.ema is not None, "optimizer": ckpt.optimizer is not None,
                             "error": f"EMA state lacks parameters {missing[:5]}" if missing else None}
            except Exception as exc:  # tell the other ranks instead of leaving them waiting
                header[0] = {"error": f"{type(exc).__name__}: {exc}"}
        dist.broadcast_object_list(header, src=0)
        info = header[0]
        if info["error"]:
            raise RuntimeError(f"cannot resume {self.out_dir}: {info['error']}")
        opts = self._state_options(broadcast_from_rank0=True)
        set_model_state_dict(self.model, ckpt.model if ckpt else {}, options=opts)
        if self.ema is not None and info["ema"]:
            self.ema.load_full_state_dict(ckpt.ema if ckpt else None, info["state"]["ema_updates"])
        if info["optimizer"]:
            optim: dict[str, Any] = {}
            if ckpt is not None and ckpt.optimizer is not None:
                # Checkpoints key the optimiser state by position; the loader wants names.
                names = self._param_names()
                optim = {
                    "state": {names[int(i)]: v for i, v in ckpt.optimizer["state"].items()},
                    "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                     for g in ckpt.optimizer["param_groups"]],
                }
            set_optimizer_state_dict(self.model, self.optimizer, optim, options=opts)
        if ckpt is None:
            ckpt = Checkpoint(Path(info["path"]), {}, None, None, info["rng"], info["state"])
        return ckpt

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
                    terms = module(x, generator=self.loss_gens[k], **extra)
                (terms["loss"] / accum).backward()
            nelbo_sum += float(terms["nelbo"].detach().mean()) / accum
            loss_sum += float(terms["loss"].detach()) / accum
        if self.fsdp:
            from torch.distributed.tensor import DTensor

            # Norms of sharded gradients are DTensors; the global norm comes back replicated.
            params = list(self.model.parameters())
            if cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        elif cfg.optim.grad_clip > 0:
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
        """The model with EMA weights loaded (raw weights when the EMA is off).

        Under FSDP the model is sharded: forward passes inside are collectives (every rank must
        make the same calls), and the EMA is swapped in shard by shard.
        """
        if self.ema is None:
            try:
                yield self.model
            finally:
                self._reshard()
        else:
            with self.ema.applied(self.model) as m:
                try:
                    yield m
                finally:
                    # Before the raw weights are copied back: they must go into the shards.
                    self._reshard()

    def _reshard(self) -> None:
        """FSDP keeps the root's parameters gathered after a forward without backward (it
        expects the backward next); put the shards back so that parameters() are the shards."""
        if self.fsdp:
            self.model.reshard()  # type: ignore[operator]

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
        self._save_pretrained()
        self._barrier()
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
        state, ema = self._full_model_state()
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
