"""What every sampler runs on: :class:`SamplingContext`, the counted denoiser calls
(:class:`_DenoiserCalls`) and the report :class:`SampleInfo`.

:func:`maskdiff.sample` checks its arguments, builds one :class:`SamplingContext` (the state z with
its fixed positions, the counted and checked denoiser, the float64 schedule, the draw settings,
the progress bar and the :class:`SampleInfo`) and hands it to the sampler's ``run``
(:mod:`maskdiff.sampling.base`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import torch
from torch import Tensor

from maskdiff.forward import Denoiser
from maskdiff.sampling.categorical import Precision, _mu64
from maskdiff.sampling.steps import _resolve_logits
from maskdiff.schedules import Schedule

__all__ = ["SampleInfo", "SamplingContext"]


@dataclass
class SampleInfo:
    """What :func:`sample` did. Shapes use B = batch size, T = number of steps.

    A *step* is one pass of the sampler's loop: one interval of the time grid for ``ancestral``
    and ``mean``, one event (one network call) for the gridless samplers (``first-hitting``,
    ``genmd4-exact``), whose ``num_steps`` is known only at the end and whose ``times`` is empty.
    """

    num_steps: int
    #: network invocations, including the final fill call if one was needed.
    denoiser_calls: int = 0
    #: sequences evaluated in total (Σ over calls of the batch size of each call).
    denoiser_rows: int = 0
    #: steps whose denoiser output came from the cache (time-agnostic denoisers only).
    cache_hits: int = 0
    #: steps that needed no denoiser output at all (lazy evaluation: nothing could unmask).
    lazy_skips: int = 0
    #: masks left after the last step and filled with the argmax of one more denoiser call.
    leftover_masks: int = 0
    #: the time grid used, (T + 1,).
    times: Tensor = field(default_factory=lambda: torch.empty(0))
    #: masks per sequence before the first step and after each step, (T + 1, B) (fixed
    #: positions never count).
    num_masked: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    #: states z (mask id V at masked positions) after the steps in ``trajectory_steps``,
    #: (K, B, L), for a visualisation strip; None unless ``record_every`` was given.
    trajectory: Tensor | None = None
    trajectory_steps: list[int] = field(default_factory=list)
    batch_size: int = 0
    #: V, the mask id that :meth:`record` counts.
    vocab_size: int | None = None
    #: :meth:`record` keeps z every this many steps (and after the last); None keeps no states.
    record_every: int | None = None
    #: the sampler's registry name and its options (``Sampler.options()``).
    sampler: str = ""
    sampler_options: dict[str, Any] = field(default_factory=dict)
    #: thinning samplers (``genmd4-exact``): candidate events proposed and rejected, summed over
    #: sequences (a rejected proposal costs a network call but unmasks nothing).
    proposals: int = 0
    rejected: int = 0
    #: anything else a sampler reports (documented by that sampler), e.g. the event times.
    extras: dict[str, Any] = field(default_factory=dict)
    _masked: list[Tensor] = field(default_factory=list, init=False, repr=False, compare=False)
    _states: list[Tensor] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def nfe_per_sample(self) -> float:
        """Denoiser evaluations per generated sequence."""
        return self.denoiser_rows / max(self.batch_size, 1)

    def record(self, step: int, z: Tensor, *, last: bool | None = None) -> None:
        """Note the state z (B, L) after ``step`` steps (0 = before the first).

        Counts its masks per sequence (for ``num_masked``) and, when ``record_every`` divides
        ``step`` or ``step`` is the last one, keeps a copy of z (for ``trajectory``). Tensors stay
        on z's device until :meth:`_finish` stacks them on the CPU. ``last`` says whether this is
        the last step (default: ``step == num_steps``; samplers whose number of steps is known
        only at the end pass it).
        """
        if self.vocab_size is None:
            raise ValueError("SampleInfo.record needs vocab_size (the mask id) to count masks")
        self._masked.append((z == self.vocab_size).sum(1))
        last = step == self.num_steps if last is None else last
        if self.record_every is not None and (step % self.record_every == 0 or last):
            self._states.append(z.clone())
            self.trajectory_steps.append(step)

    def _finish(self) -> None:
        """Stack what :meth:`record` kept into ``num_masked`` (T + 1, B) and ``trajectory`` (K, B, L)."""
        self.num_masked = torch.stack(self._masked).cpu()
        if self.record_every is not None:
            self.trajectory = torch.stack(self._states).cpu()
        self._masked, self._states = [], []


class _DenoiserCalls:
    """The sampler's calls to the denoiser: counts, a finite-logit check and an optional cache.

    ``denoise(z, t)`` returns logits (B, L, V) for the state z (B, L) at time t, a 0-d tensor
    (one time for the batch) or (B,) (one per sequence), calling ``denoiser(z, t as float32
    (B,))``. With ``use_cache`` (exact only for a time-agnostic denoiser, whose output depends on
    z alone) the previous output is returned while no row changed since it was computed; the
    caller reports changes with :meth:`changed`. ``cache_scope="row"`` re-evaluates only the changed rows and writes them
    into a copy of the cached output.

    Attributes:
        calls: denoiser invocations; rows: sequences evaluated in total (Σ of each call's batch
            size); cache_hits: requests answered from the cache.
        cached: the last output (B, L, V), or None; dirty: (B,) bool, rows changed since then.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        batch_size: int,
        length: int,
        vocab_size: int,
        *,
        use_cache: bool = False,
        cache_scope: Literal["batch", "row"] = "batch",
        device: torch.device | str | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.length = length
        self.vocab_size = vocab_size
        self.use_cache = use_cache
        self.cache_scope = cache_scope
        self.cached: Tensor | None = None
        self.dirty = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.calls = 0
        self.rows = 0
        self.cache_hits = 0

    @property
    def requests(self) -> int:
        """How often logits were asked for: each request is one call or one cache hit."""
        return self.calls + self.cache_hits

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        """Logits (B, L, V) for z (B, L) at time t (0-d or (B,)), from the cache when nothing changed."""
        if not self.use_cache:
            return self._evaluate(z, t)
        if self.cached is not None and not bool(self.dirty.any()):
            self.cache_hits += 1
            return self.cached
        if self.cached is None or self.cache_scope == "batch" or bool(self.dirty.all()):
            self.cached = self._evaluate(z, t)
        else:
            rows = self.dirty.nonzero(as_tuple=True)[0]
            cached = self.cached.clone()
            cached[rows] = self._evaluate(z[rows], t[rows] if t.dim() else t).to(cached.dtype)
            self.cached = cached
        self.dirty.zero_()
        return self.cached

    def changed(self, z_old: Tensor, z_new: Tensor) -> None:
        """Mark the rows in which z_new (B, L) differs from z_old as changed since the cached output."""
        self.dirty |= (z_new != z_old).any(1)

    def _evaluate(self, z: Tensor, t: Tensor) -> Tensor:
        """One denoiser call on z (N, L) at time t (0-d or (N,)), counted and checked: logits (N, L, V)."""
        n = z.shape[0]
        logits = self.denoiser(z, t.to(torch.float32).expand(n).contiguous())
        self.calls += 1
        self.rows += n
        if not isinstance(logits, Tensor) or tuple(logits.shape) != (n, self.length, self.vocab_size):
            _resolve_logits(logits, n, self.length, self.vocab_size)  # raises with a clear message
        self.check_finite(logits)
        return logits

    @staticmethod
    def check_finite(logits: Tensor) -> None:
        """Raise ValueError on NaN or +inf logits or a row whose logits are all -inf (-inf alone is allowed)."""
        if not bool(torch.isfinite(logits).all()) and (  # one pass when all finite
            bool(torch.isnan(logits).any())
            or bool(torch.isposinf(logits).any())
            or bool((logits.amax(-1) == -math.inf).any())
        ):
            raise ValueError("denoiser returned NaN/+inf logits or a row with every logit -inf")


@dataclass
class SamplingContext:
    """The shared state of one call of :func:`maskdiff.sample`, handed to ``Sampler.run``.

    A sampler reads the settings, asks for logits through :meth:`denoise` (counted, checked, cached
    for time-agnostic denoisers), moves the state on with :meth:`advance` and leaves ``z`` with no
    mask at a ``free`` position. Fixed positions (prompt, suffix, infilling template) are never
    free; :meth:`advance` keeps every position that is not free as it was.

    Attributes:
        calls: the counted denoiser (:class:`_DenoiserCalls`); ``calls.calls`` etc. are the counts.
        schedule: the schedule as a float64 copy on ``device`` (α in float64 for every sampler).
        z: (B, L) the current state, mask id V at masked positions.
        free: (B, L) bool, the positions this sampler generates (masked at the start, not fixed).
            Block generation narrows it to one block at a time.
        fixed: (B, L) token ids at fixed positions and ``FREE`` (-1) elsewhere, or None.
        vocab_size: V (= the mask id). num_steps, times: the requested number of steps T and the
            float64 time grid (T + 1,) on ``device`` (gridless samplers ignore both).
        generator: the random stream (every random number of a sampler comes from it).
        temperature, top_k, top_p, precision: the draw settings (:meth:`mu`, :attr:`draw`).
        lazy: the caller allows skipping the denoiser when a step can tell without μ that
            nothing unmasks. progress: show a progress bar (:meth:`steps`).
        info: the :class:`SampleInfo` being filled.
        grid_alphas: ``grid_alphas()`` gives α at the grid times, ``alphas[i]`` (1, 1) or (1, V)
            in float64, computed in blocks (``maskdiff.sampling.sampler._GridAlphas``).
        on_step: the caller's hook ``on_step(step, z)``, called by :meth:`advance` (and by
            :func:`maskdiff.sample` before the first step).
    """

    calls: _DenoiserCalls
    schedule: Schedule
    z: Tensor
    free: Tensor
    fixed: Tensor | None
    vocab_size: int
    num_steps: int
    times: Tensor
    generator: torch.Generator | None
    temperature: float
    top_k: int | None
    top_p: float | None
    precision: Precision
    lazy: bool
    progress: bool
    info: SampleInfo
    grid_alphas: Callable[[], Any]
    on_step: Callable[[int, Tensor], None] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.z.shape[0])

    @property
    def length(self) -> int:
        return int(self.z.shape[1])

    @property
    def device(self) -> torch.device:
        return self.z.device

    @property
    def per_token(self) -> bool:
        """Whether the schedule's α depends on the token (GenMD4)."""
        return bool(getattr(self.schedule, "per_token", False))

    @property
    def draw(self) -> dict[str, Any]:
        """The keyword arguments of the step functions (:func:`~maskdiff.sampling.steps.ancestral_step`)."""
        return dict(generator=self.generator, precision=self.precision, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p, vocab_size=self.vocab_size)

    def denoise(self, z: Tensor, t: Tensor) -> Tensor:
        """Logits (B, L, V) for z (B, L) at time t (0-d, or (B,) one time per sequence)."""
        return self.calls(z, t)

    def mu(self, logits: Tensor) -> Tensor:
        """μ = softmax of the transformed logits (temperature, top-k, top-p), float64, shape of ``logits``."""
        return _mu64(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def masked(self, z: Tensor | None = None) -> Tensor:
        """(B, L) bool: the free positions still masked in z (default: the current state)."""
        return ((self.z if z is None else z) == self.vocab_size) & self.free

    def advance(self, z_new: Tensor, step: int, *, last: bool | None = None) -> Tensor:
        """Make z_new the current state after ``step`` steps: positions that are not free keep their
        tokens, the cache learns which rows changed, :attr:`info` records it. Returns the new z."""
        z_new = torch.where(self.free, z_new, self.z)
        self.calls.changed(self.z, z_new)
        self.z = z_new
        self.info.record(step, z_new, last=last)
        if self.on_step is not None:
            self.on_step(step, z_new)
        return z_new

    def fill_leftover(self, t: Tensor) -> Tensor:
        """Fill the free positions still masked with the argmax of one more denoiser call at time t
        (the ancestral sampler's end, when the grid's last step left masks); counted in
        ``info.leftover_masks``. Returns the new z."""
        leftover = self.masked()
        self.info.leftover_masks = int(leftover.sum())
        if self.info.leftover_masks:
            self.z = torch.where(leftover, self.denoise(self.z, t).argmax(-1), self.z)
        return self.z

    def steps(self, total: int, unit: str = "step") -> Iterable[int]:
        """``range(total)``, with a tqdm bar when ``progress``."""
        if not self.progress:
            return range(total)
        from tqdm.auto import tqdm  # imported on use: no import-time cost

        return tqdm(range(total), desc="sampling", unit=unit)

    def bar(self, total: int, unit: str = "token") -> Any:
        """A progress bar with ``update(n)`` and ``close()`` (a silent one unless ``progress``), for
        loops whose length is known only at the end (count tokens instead of steps)."""
        if not self.progress:
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="sampling", unit=unit)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
