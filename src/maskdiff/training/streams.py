"""Training data and randomness as *streams*: the reason a resumed run continues bit for bit.

A step consumes ``n_streams = world_size × grad_accum`` micro-batches of ``batch_size / n_streams``
sequences each. Micro-batch *k* of every step belongs to stream *k*, and stream *k*

* reads only shard *k* of the training data (a contiguous block of the token stream, or of the
  images), and
* draws its crops (or images) from its own *data* generator and its diffusion times and masks
  from its own *loss* generator, both seeded from ``(train.seed, k)`` alone.

Process *r* with ``grad_accum = A`` owns streams ``r·A … r·A + A − 1``. Which process computes a
micro-batch, and whether it is an accumulation step or another rank's share, therefore changes
nothing but the order of float additions: two processes with ``grad_accum=1`` compute the same
step as one process with ``grad_accum=2``. Every generator state is checkpointed (with each
process's global torch RNG, which dropout uses), so a resumed run draws exactly what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskdiff.data import ImageSplits, TokenSplits

__all__ = ["Streams", "stream_seed"]

# Purposes of a stream seed (the third argument of stream_seed).
_MODEL_INIT, _DATA, _LOSS = 0, 1, 2


def stream_seed(seed: int, stream: int, purpose: int) -> int:
    """The seed of one generator: run ``seed``, ``stream`` k, ``purpose`` (0 init, 1 data, 2 loss)."""
    return (seed * 1_000_003 + stream * 7_919 + purpose * 104_729) % (2**62)


def model_init_seed(seed: int) -> int:
    """The seed of the global torch RNG when the model is initialised (the same on every rank)."""
    return stream_seed(seed, 0, _MODEL_INIT)


class Streams:
    """This process's streams: their shards, data and loss generators, and their RNG state.

    Args:
        data: the run's data (text tokens or images).
        seed: the run seed (``train.seed``).
        rank, world_size: this process and the number of processes.
        grad_accum: micro-batches per process per step.
        batch_size: sequences per step over all processes and micro-batches.
        seq_len: ``L``, the crop length (text).
        device: where batches go and where the loss generators live.
        use_labels: return class labels with the batches (class-conditional models; the data
            must have labels, text never does).

    The data is used only through the interface ``TokenSplits`` and ``ImageSplits`` share:
    ``shard_for(k, n_streams, seq_len)`` once per stream, ``draw(shard, b, seq_len, generator)``
    per micro-batch.

    Raises:
        ValueError: ``batch_size`` is not divisible by ``world_size × grad_accum``, or a shard
            is too small to draw from (``data.shard_for``).
    """

    def __init__(
        self,
        data: TokenSplits | ImageSplits,
        *,
        seed: int,
        rank: int,
        world_size: int,
        grad_accum: int,
        batch_size: int,
        seq_len: int,
        device: torch.device,
        use_labels: bool,
    ) -> None:
        self.data = data
        self.rank = rank
        self.seq_len = seq_len
        self.device = device
        self.use_labels = use_labels
        self.n_streams = world_size * grad_accum
        if batch_size % self.n_streams:
            raise ValueError(
                f"train.batch_size={batch_size} must be divisible by world_size × grad_accum = "
                f"{world_size} × {grad_accum}"
            )
        self.micro_batch = batch_size // self.n_streams
        #: The streams this process computes, in accumulation order.
        self.mine = [rank * grad_accum + a for a in range(grad_accum)]
        #: Stream k's part of the training data (``data.shard_for``), as ``data.draw`` takes it.
        self.shards = {k: data.shard_for(k, self.n_streams, seq_len) for k in self.mine}
        self.data_gens = {k: torch.Generator().manual_seed(stream_seed(seed, k, _DATA)) for k in self.mine}
        self.loss_gens = {
            k: torch.Generator(device=device).manual_seed(stream_seed(seed, k, _LOSS)) for k in self.mine
        }

    def next_batch(self, stream: int) -> tuple[Tensor, Tensor | None]:
        """The next micro-batch of a stream: (x (b, L), labels (b,) or None) on the device."""
        x, y = self.data.draw(self.shards[stream], self.micro_batch, self.seq_len, self.data_gens[stream])
        return x.to(self.device), (y.to(self.device) if self.use_labels and y is not None else None)

    def loss_generator(self, stream: int) -> torch.Generator:
        """The generator of a stream's diffusion times and masks (on the device)."""
        return self.loss_gens[stream]

    def rng_state(self) -> dict[str, Tensor]:
        """This process's part of the checkpointed RNG state, as CPU tensors.

        Keys: ``data.<k>`` and ``loss.<k>`` for each of its streams, ``torch_cpu.rank<r>`` and (on
        CUDA) ``torch_cuda.rank<r>`` for its global torch RNG.
        """
        local = {f"data.{k}": g.get_state() for k, g in self.data_gens.items()}
        local.update({f"loss.{k}": g.get_state().cpu() for k, g in self.loss_gens.items()})
        local[f"torch_cpu.rank{self.rank}"] = torch.get_rng_state()
        if self.device.type == "cuda":
            local[f"torch_cuda.rank{self.rank}"] = torch.cuda.get_rng_state(self.device)
        return local

    def load_rng_state(self, rng: dict[str, Tensor]) -> None:
        """Restore what :meth:`rng_state` saved (merged over all ranks); absent keys are left alone.

        A checkpoint written with another ``world_size × grad_accum`` lacks some streams: those
        start from their seeds.
        """
        for k in self.mine:
            if f"data.{k}" in rng:
                self.data_gens[k].set_state(rng[f"data.{k}"])
                self.loss_gens[k].set_state(rng[f"loss.{k}"].to(self.loss_gens[k].get_state().device))
        cpu_key = f"torch_cpu.rank{self.rank}"
        if cpu_key in rng:
            torch.set_rng_state(rng[cpu_key])
        cuda_key = f"torch_cuda.rank{self.rank}"
        if cuda_key in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng[cuda_key], self.device)
