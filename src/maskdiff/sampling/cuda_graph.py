"""Fast denoiser calls for sampling: bf16, static shapes, replayed from a CUDA graph.

A sampling step calls the same network on the same shapes hundreds of times. At batch 1 the GPU
work per call is small (about 0.25 TFLOP for MD4-S at 1,024 tokens, a fraction of a millisecond
on an H100), so launching ~200 kernels one by one from Python would dominate. A CUDA graph
records the kernels once and replays them with a single launch.

:class:`GraphDenoiser` wraps a :class:`maskdiff.networks.Transformer` as a sampler denoiser
``(z (B, L), t (B,)) -> float32 logits (B, L, V)``:

* on CUDA the network runs on a bf16 *copy* of its weights (``dtype``), made once when the
  wrapper is built: autocast would re-cast all fp32 weights on every call (0.7 GB of reads per
  call for MD4-S, a sizeable part of a 1 ms budget). Later changes to the original network's
  weights are not seen by the wrapper;
* on CUDA with ``use_graph=True``: inputs are copied into static buffers and the captured graph
  is replayed (captured lazily on the first call with the configured shape, after warm-up
  iterations on a side stream, as the CUDA-graph rules require); other shapes (for example the
  sampler's ``cache_scope="row"`` subsets) fall back to an eager call;
* otherwise (CPU, or ``use_graph=False``): an eager call, with the bf16 copy on CUDA and the
  network itself in float32 on the CPU. The CPU path is what the tests exercise.

The returned logits are a fresh tensor (the graph's output buffer is overwritten by the next
replay, and the sampler may keep an output while it caches). Input checks that read values
back to the host are skipped during capture (see ``maskdiff.networks.base._may_sync``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GraphDenoiser"]


class GraphDenoiser:
    """A network as a sampler denoiser, captured in a CUDA graph for one (batch, length).

    Args:
        network: a :class:`maskdiff.networks.Transformer` (or any module
            ``network(z, t, labels=...) -> logits``) in eval mode.
        batch_size, length: the static shape (B, L) that is captured.
        labels: (B,) class labels bound to every call (class-conditional networks), or None.
        dtype: weight and compute dtype on CUDA (bf16 by default; float32 uses the network
            itself). Ignored on the CPU.
        use_graph: capture and replay a CUDA graph (CUDA only).
        warmup: eager calls on a side stream before capture (lets cuBLAS/SDPA pick kernels and
            allocate workspaces outside the graph).

    Attributes:
        time_conditioning: copied from the network, so the sampler knows whether caching is exact.
        replays, eager_calls: how many calls used the graph and how many ran eagerly.
    """

    def __init__(
        self,
        network: nn.Module,
        batch_size: int,
        length: int,
        *,
        labels: Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
        use_graph: bool = True,
        warmup: int = 3,
    ) -> None:
        if batch_size < 1 or length < 1:
            raise ValueError(f"batch_size and length must be positive, got {batch_size} and {length}")
        self.shape = (int(batch_size), int(length))
        self.device = next(network.parameters()).device
        self.on_cuda = self.device.type == "cuda"
        self.dtype = dtype if self.on_cuda else torch.float32
        if self.dtype != torch.float32:
            network = copy.deepcopy(network).to(self.dtype).eval()  # weights cast once, not per call
        self.network = network
        self.use_graph = bool(use_graph) and self.on_cuda
        self.warmup = int(warmup)
        self.labels = None if labels is None else torch.as_tensor(labels, device=self.device).long()
        if self.labels is not None and tuple(self.labels.shape) != (batch_size,):
            raise ValueError(f"labels must have shape ({batch_size},), got {tuple(self.labels.shape)}")
        self.time_conditioning = bool(getattr(network, "time_conditioning", True))
        self.vocab_size = getattr(network, "vocab_size", None)
        self.replays = 0
        self.eager_calls = 0
        self._graph: Any = None
        self._static_z: Tensor | None = None
        self._static_t: Tensor | None = None
        self._static_out: Tensor | None = None

    def _forward(self, z: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        with torch.no_grad():
            if labels is None:
                return self.network(z, t)
            return self.network(z, t, labels=labels)

    def _capture(self, z: Tensor, t: Tensor) -> None:
        """Warm up on a side stream, then record one forward pass into a CUDA graph."""
        self._static_z = z.clone()
        self._static_t = t.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._forward(self._static_z, self._static_t, self.labels)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = self._forward(self._static_z, self._static_t, self.labels)
        self._graph = graph

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        """Logits (B, L, V) in float32 for tokens z (B, L) and times t (B,)."""
        t = torch.as_tensor(t, device=z.device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(z.shape[0])
        if not self.use_graph or tuple(z.shape) != self.shape:
            self.eager_calls += 1
            labels = self.labels
            if labels is not None and labels.shape[0] != z.shape[0]:
                raise ValueError("a denoiser with bound labels must be called on its full batch")
            return self._forward(z, t, labels).float()
        if self._graph is None:
            # Validate once, eagerly (capture skips the checks that sync with the host).
            self._forward(z, t, self.labels)
            self._capture(z, t)
        assert self._static_z is not None and self._static_t is not None and self._static_out is not None
        self._static_z.copy_(z)
        self._static_t.copy_(t)
        self._graph.replay()
        self.replays += 1
        return self._static_out.to(torch.float32, copy=True)  # a new tensor: the buffer is overwritten by the next replay
