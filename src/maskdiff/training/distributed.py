"""Data parallelism for the trainer: process group, FSDP2 sharding, full-state gathers and restores.

Under ``torchrun`` (``WORLD_SIZE > 1``) rendezvous, ranks and devices come from torchrun's
environment, so the same command works on one node or many. The trainer has two modes
(``train.parallel``):

* ``ddp`` (default): every process holds the whole model, optimiser state and EMA; gradients are
  all-reduced (``DistributedDataParallel``, wrapped by the trainer).
* ``fsdp``: FSDP2 (:func:`shard_model`). Parameters, gradients, AdamW moments and the EMA are
  sharded over the processes.

Both modes write the same checkpoints: full, unsharded state dicts written by rank 0. The
functions here convert between those and the sharded model (:func:`full_model_state`,
:func:`full_optimizer_state`, :func:`restore_sharded`). Every function that gathers or scatters
is a collective: every rank must call it. They take the model, optimiser, EMA and
:class:`DistInfo` explicitly, not the trainer.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from maskdiff.checkpoint import Checkpoint, load_checkpoint
from maskdiff.model import MaskedDiffusion
from maskdiff.training.ema import EMA

T = TypeVar("T")

__all__ = [
    "DistInfo",
    "init_distributed",
    "barrier",
    "destroy_process_group",
    "shard_model",
    "reshard",
    "state_options",
    "param_names",
    "full_model_state",
    "full_optimizer_state",
    "restore_sharded",
    "mean_across_ranks",
    "gather_rng_states",
    "on_main",
]


@dataclass
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join torchrun's process group (nccl on CUDA, gloo otherwise), or run alone.

    A group that is already initialised is reused. Without ``WORLD_SIZE > 1`` nothing is set up.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def on_main(fn: Callable[[], T], info: DistInfo) -> T | None:
    """Run ``fn`` on rank 0 only (others get None); when it raises, every rank raises.

    Rank 0 raises the exception itself, the other ranks a RuntimeError with its message, so that
    no rank waits forever for one that failed (e.g. a run folder check). A collective when
    ``world_size > 1``.
    """
    if info.world_size == 1:
        return fn()
    result: T | None = None
    error: BaseException | None = None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # tell the other ranks, then raise it here
            error = exc
    message = [None if error is None else f"{error}"]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(message[0])
    return result


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    """Barrier, then destroy the process group (no-op without one).

    Drop everything that holds communication state first (DDP wrapper; sharded model, EMA and
    optimiser): with gloo a process group destroyed under live users sometimes crashes.
    """
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def shard_model(
    model: MaskedDiffusion, device: torch.device, world_size: int, autocast_dtype: torch.dtype | None
) -> MaskedDiffusion:
    """FSDP2: shard each block (``network.shard_units()``), then the root (embeddings, head, schedule, rest).

    Per-block units let a block's parameters be gathered just before it runs and freed after,
    so peak memory is the shards plus about one full block. The root unit makes the model
    itself the module the trainer calls (``fully_shard`` changes its class in place). The
    mesh spans all processes (one dimension: pure data-parallel sharding); it is built from
    the process group torchrun set up, on one node or many.

    Build the model on the CPU, identically on every process: ``fully_shard`` moves only this
    process's shards to ``device``, so no device ever holds all of it. On CUDA with bf16
    autocast the gathered parameters are bf16 and gradients are reduced in float32; the
    sharded master weights stay float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    if device.type == "cuda" and autocast_dtype == torch.bfloat16:
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


def reshard(model: nn.Module, *, fsdp: bool) -> None:
    """Put an FSDP model's root parameters back into shards (no-op unless ``fsdp``).

    FSDP keeps the root's parameters gathered after a forward without backward (it expects the
    backward next); after evaluation this makes ``parameters()`` the shards again.
    """
    if fsdp:
        model.reshard()  # type: ignore[operator]


def state_options(**kwargs: bool) -> Any:
    """``StateDictOptions`` for full (unsharded) state dicts, plus ``kwargs``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def param_names(model: nn.Module) -> list[str]:
    """Parameter names in the optimiser's order (it was built from ``model.parameters()``)."""
    return [name for name, _ in model.named_parameters()]


def full_model_state(
    model: nn.Module, ema: EMA | None, info: DistInfo
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """(model, EMA) state of the sharded model as full CPU tensors, on rank 0 only.

    These are gathers, so every rank must call this; the other ranks get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # cpu_offload: the full tensors land in rank 0's host memory, nowhere else.
    state = get_model_state_dict(model, options=state_options(cpu_offload=True))
    ema_state = ema.full_state_dict(keep=info.is_main) if ema else None
    return (state, ema_state) if info.is_main else ({}, None)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict[str, Any]:
    """AdamW state of the sharded model, full and in ``optimizer.state_dict()`` layout, on
    rank 0 only (every rank must call this).

    It comes back keyed by parameter name and is re-keyed by position, the layout DDP and
    single-process runs write, so that any run can resume it.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optim = get_optimizer_state_dict(model, optimizer, options=state_options(cpu_offload=True))
    if not info.is_main:
        return {}
    position = {name: i for i, name in enumerate(param_names(model))}
    return {
        "state": {position[name]: value for name, value in optim["state"].items()},
        "param_groups": [{**g, "params": [position[name] for name in g["params"]]} for g in optim["param_groups"]],
    }


def _read_header(run_dir: Path, ema: EMA | None) -> tuple[Checkpoint | None, list[Any]]:
    """Rank 0 reads the latest checkpoint; the small parts go into a header for the other ranks."""
    ckpt: Checkpoint | None = None
    header: list[Any] = [None]
    try:
        ckpt = load_checkpoint(run_dir, device="cpu")
        missing = ema.missing(ckpt.ema) if ema is not None and ckpt.ema is not None else []
        header[0] = {"path": str(ckpt.path), "state": ckpt.state, "rng": ckpt.rng,
                     "ema": ckpt.ema is not None, "optimizer": ckpt.optimizer is not None,
                     "error": f"EMA state lacks parameters {missing[:5]}" if missing else None}
    except Exception as exc:  # tell the other ranks instead of leaving them waiting
        header[0] = {"error": f"{type(exc).__name__}: {exc}"}
    return ckpt, header


def restore_sharded(
    run_dir: Path, model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer, info: DistInfo
) -> Checkpoint:
    """Load the latest (full) checkpoint of ``run_dir`` into the sharded model, EMA and optimiser.

    Only rank 0 reads the files (into host memory); the tensors are scattered from it
    (``broadcast_from_rank0``), and the small parts (step counters, RNG streams) are sent as
    objects, so the other ranks never hold a full copy and need not see the run folder.
    Returns the checkpoint with its tensors on rank 0 only (``state`` and ``rng`` on all).

    Raises:
        RuntimeError: on every rank, when rank 0 cannot read the checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    ckpt: Checkpoint | None = None
    header: list[Any] = [None]
    if info.is_main:
        ckpt, header = _read_header(run_dir, ema)
    dist.broadcast_object_list(header, src=0)
    head = header[0]
    if head["error"]:
        raise RuntimeError(f"cannot resume {run_dir}: {head['error']}")
    opts = state_options(broadcast_from_rank0=True)
    set_model_state_dict(model, ckpt.model if ckpt else {}, options=opts)
    if ema is not None and head["ema"]:
        ema.load_full_state_dict(ckpt.ema if ckpt else None, head["state"]["ema_updates"])
    if head["optimizer"]:
        optim: dict[str, Any] = {}
        if ckpt is not None and ckpt.optimizer is not None:
            # Checkpoints key the optimiser state by position; the loader wants names.
            names = param_names(model)
            optim = {
                "state": {names[int(i)]: v for i, v in ckpt.optimizer["state"].items()},
                "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                 for g in ckpt.optimizer["param_groups"]],
            }
        set_optimizer_state_dict(model, optimizer, optim, options=opts)
    if ckpt is None:
        ckpt = Checkpoint(Path(head["path"]), {}, None, None, head["rng"], head["state"])
    return ckpt


def mean_across_ranks(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """The mean of each scalar over the ranks (every rank gets it; a collective)."""
    if info.world_size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}


def gather_rng_states(local: dict[str, Tensor], info: DistInfo) -> dict[str, Tensor]:
    """Every rank's RNG states merged into one dict (keys must differ between ranks; a collective)."""
    if info.world_size == 1:
        return local
    gathered: list[dict[str, Tensor]] = [None] * info.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    merged: dict[str, Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged
