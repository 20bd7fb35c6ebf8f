"""The sampling loop: :func:`sample`, and :class:`SampleInfo`, what it reports.

:func:`sample` checks its arguments (:func:`_check_sample_args`), then applies one reverse step
(:func:`~maskdiff.sampling.steps.ancestral_step` or :func:`~maskdiff.sampling.steps.mean_step`)
per interval of the time grid. Its calls to the denoiser go through :class:`_DenoiserCalls`,
which counts them, checks the logits and, for a time-agnostic denoiser, reuses the previous
output while no token changed (docs/math.md, "Caching for time-agnostic denoisers").
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from maskdiff.forward import Denoiser
from maskdiff.sampling.categorical import Precision, _check_precision, _check_transform_args
from maskdiff.sampling.conditioning import _prepare_fixed
from maskdiff.sampling.steps import (
    LogitsSource,
    _check_grid,
    _resolve_logits,
    ancestral_step,
    mean_step,
    time_grid,
    vocab_alpha,
)
from maskdiff.schedules import Schedule

__all__ = ["SampleInfo", "sample"]


@dataclass
class SampleInfo:
    """What :func:`sample` did. Shapes use B = batch size, T = number of steps."""

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
    _masked: list[Tensor] = field(default_factory=list, init=False, repr=False, compare=False)
    _states: list[Tensor] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def nfe_per_sample(self) -> float:
        """Denoiser evaluations per generated sequence."""
        return self.denoiser_rows / max(self.batch_size, 1)

    def record(self, step: int, z: Tensor) -> None:
        """Note the state z (B, L) after ``step`` steps (0 = before the first).

        Counts its masks per sequence (for ``num_masked``) and, when ``record_every`` divides
        ``step`` or ``step`` is the last one, keeps a copy of z (for ``trajectory``). Tensors stay
        on z's device until :meth:`_finish` stacks them on the CPU.
        """
        if self.vocab_size is None:
            raise ValueError("SampleInfo.record needs vocab_size (the mask id) to count masks")
        self._masked.append((z == self.vocab_size).sum(1))
        if self.record_every is not None and (step % self.record_every == 0 or step == self.num_steps):
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

    ``denoise(z, t)`` returns logits (B, L, V) for the state z (B, L) at the scalar time t (a
    0-d tensor), calling ``denoiser(z, t as float32 (B,))``. With ``use_cache`` (exact only for a
    time-agnostic denoiser, whose output depends on z alone) the previous output is returned
    while no row changed since it was computed; the caller reports changes with
    :meth:`changed`. ``cache_scope="row"`` re-evaluates only the changed rows and writes them
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
        """Logits (B, L, V) for z (B, L) at time t (0-d), from the cache when nothing changed."""
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
            cached[rows] = self._evaluate(z[rows], t).to(cached.dtype)
            self.cached = cached
        self.dirty.zero_()
        return self.cached

    def changed(self, z_old: Tensor, z_new: Tensor) -> None:
        """Mark the rows in which z_new (B, L) differs from z_old as changed since the cached output."""
        self.dirty |= (z_new != z_old).any(1)

    def _evaluate(self, z: Tensor, t: Tensor) -> Tensor:
        """One denoiser call on z (N, L) at time t (0-d), counted and checked: logits (N, L, V)."""
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


#: Largest block of a per-token schedule's α table, in elements (2**20 float64: 8 MiB): α over
#: the vocabulary is computed for this many // V grid times at a time, never for the whole grid.
ALPHA_BLOCK_ELEMENTS = 2**20
#: True evaluates a per-token schedule's α for the whole grid at once, a (T + 1, V) float64 table,
#: as 0.1 did (bench/bench_memory.py sets it to measure that path).
PER_TOKEN_ALPHA_TABLE = False


class _GridAlphas:
    """α over the vocabulary at the grid times, in float64: ``alphas[i]`` is (1, 1) or (1, V).

    A scalar schedule's α is one (T + 1, 1) table. A per-token schedule's is computed in blocks of
    :data:`ALPHA_BLOCK_ELEMENTS` // V grid times when first asked for, and only the last two
    blocks are kept (a step uses α at t_i and t_{i+1}), so the sampler never holds a (T + 1, V)
    table (400 MB at T = 1,000 and GPT-2's V). A grid that fits one block is one table, as before.
    """

    def __init__(self, schedule: Schedule, times: Tensor, vocab_size: int) -> None:
        self.schedule, self.times, self.vocab_size = schedule, times, vocab_size
        per_token = bool(getattr(schedule, "per_token", False)) and not PER_TOKEN_ALPHA_TABLE
        self.rows = max(2, ALPHA_BLOCK_ELEMENTS // vocab_size) if per_token else len(times)
        self.blocks: dict[int, Tensor] = {}

    def __getitem__(self, i: int) -> Tensor:
        k = i // self.rows
        if k not in self.blocks:
            self.blocks = {j: block for j, block in self.blocks.items() if j == k - 1}
            times = self.times[k * self.rows : (k + 1) * self.rows]
            self.blocks[k] = vocab_alpha(self.schedule, times, self.vocab_size, dtype=torch.float64)
        j = i - k * self.rows
        return self.blocks[k][j : j + 1]


def _owner(denoiser: Any) -> Any:
    """The denoiser itself, or the object a bound method belongs to (e.g. ``model.denoiser``)."""
    return denoiser if isinstance(denoiser, nn.Module) else getattr(denoiser, "__self__", None)


def _module_device(obj: Any) -> torch.device | None:
    if isinstance(obj, nn.Module):
        for p in obj.parameters():
            return p.device
        for buf in obj.buffers():
            return buf.device
    return None


def _prepare_schedule(schedule: Schedule, dtype: torch.dtype, device: torch.device) -> Schedule:
    """A copy of an ``nn.Module`` schedule in ``dtype`` on ``device`` (the original is untouched)."""
    if not isinstance(schedule, nn.Module):
        return schedule
    tensors = list(schedule.parameters()) + list(schedule.buffers())
    if all((not t.is_floating_point() or t.dtype == dtype) and t.device == device for t in tensors):
        return schedule
    return copy.deepcopy(schedule).to(device=device, dtype=dtype)


def _is_time_agnostic(denoiser: Any, time_agnostic: bool | None) -> bool:
    declared = getattr(denoiser, "time_conditioning", getattr(_owner(denoiser), "time_conditioning", None))
    if time_agnostic is None:
        # Rule: a denoiser that does not say otherwise is assumed to use t.
        return declared is False
    if time_agnostic and declared is True:
        raise ValueError(
            "time_agnostic=True contradicts denoiser.time_conditioning=True; a time-conditioned "
            "network's output depends on t, so its outputs cannot be reused across steps"
        )
    return bool(time_agnostic)


def _check_sample_args(
    denoiser: Denoiser,
    schedule: Schedule,
    *,
    batch_size: int,
    length: int,
    vocab_size: int,
    num_steps: int,
    sampler: str,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    precision: str,
    cache: bool | str,
    cache_scope: str,
    time_agnostic: bool | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    return_info: bool,
    record_every: int | None,
) -> tuple[bool, torch.device]:
    """Check :func:`sample`'s arguments (same names) and resolve the cache setting and the device.

    Raises ValueError naming the first bad argument, in signature order, then the combinations:
    ``sampler="mean"`` with a per-token schedule, ``cache=True`` or ``time_agnostic=True`` with a
    time-conditioned denoiser, a generator on another device type. Warns when the denoiser (or
    its owner) is an ``nn.Module`` in training mode. The time grid and ``fixed`` are checked
    where they are prepared (:func:`time_grid`/``_check_grid``, ``_prepare_fixed``).

    Returns:
        (use_cache, device): whether to reuse denoiser outputs (``cache="auto"``: exactly when
        the denoiser is time-agnostic), and where to sample (``device``, else the denoiser's
        parameter device, else the CPU).
    """
    for name, val in (("batch_size", batch_size), ("length", length), ("vocab_size", vocab_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if sampler not in ("ancestral", "mean"):
        raise ValueError(f"sampler must be 'ancestral' or 'mean', got {sampler!r}")
    _check_precision(precision)
    _check_transform_args(temperature, top_k, top_p)
    if isinstance(cache, str):
        if cache != "auto":
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
    elif isinstance(cache, (bool, int)):
        cache = bool(cache)
    else:
        raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
    if cache_scope not in ("batch", "row"):
        raise ValueError(f"cache_scope must be 'batch' or 'row', got {cache_scope!r}")
    if record_every is not None:
        if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 1:
            raise ValueError(f"record_every must be None or an int ≥ 1, got {record_every!r}")
        if not return_info:
            raise ValueError("record_every records into the SampleInfo: pass return_info=True as well")
    if sampler == "mean" and bool(getattr(schedule, "per_token", False)):
        raise ValueError(
            "the 'mean' sampler needs a scalar schedule: with a per-token schedule (GenMD4) the "
            "unmasking probability depends on the token; use sampler='ancestral'"
        )
    agnostic = _is_time_agnostic(denoiser, time_agnostic)
    if cache is True and not agnostic:
        raise ValueError(
            "cache=True needs a time-agnostic denoiser (its output must depend on z only), but this "
            "denoiser is time-conditioned (time_conditioning is True or not set). Use cache=False, "
            "cache='auto', or pass time_agnostic=True if the network really ignores t"
        )
    owner = _owner(denoiser)
    dev = (_module_device(owner) or torch.device("cpu")) if device is None else torch.device(device)
    if generator is not None and generator.device.type != dev.type:
        raise ValueError(
            f"generator is on {generator.device} but sampling runs on {dev}: create it with "
            f"torch.Generator(device={str(dev)!r})"
        )
    if isinstance(owner, nn.Module) and owner.training:
        warnings.warn(  # stacklevel 3: the caller of sample()
            "the denoiser is in training mode (dropout etc. active); call denoiser.eval() before sampling",
            stacklevel=3,
        )
    return (agnostic if cache == "auto" else bool(cache)), dev


def sample(
    denoiser: Denoiser,
    schedule: Schedule,
    *,
    batch_size: int,
    length: int,
    vocab_size: int,
    num_steps: int,
    grid: str | Tensor = "cosine",
    generator: torch.Generator | None = None,
    sampler: Literal["ancestral", "mean"] = "ancestral",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    precision: Precision = "float64",
    cache: bool | Literal["auto"] = False,
    cache_scope: Literal["batch", "row"] = "batch",
    lazy: bool = True,
    time_agnostic: bool | None = None,
    fixed: Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    return_info: bool = False,
    record_every: int | None = None,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """Generate ``batch_size`` sequences of ``length`` tokens with the MD4/GenMD4 reverse process.

    Starts from all masks (except ``fixed`` positions) at t = 1 and applies ``num_steps`` steps
    along the time grid (``"cosine"``, ``"uniform"``, or a strictly decreasing tensor of T + 1
    times); masks left after the last step are filled with the argmax of one more denoiser call
    at the last grid time (0 for the built-in grids).

    Args:
        denoiser: ``denoiser(z (B, L) long, t (B,) float32) -> logits (B, L, V)``. If it (or,
            for a bound method such as ``model.denoiser``, its owner) has
            ``time_conditioning = False`` it is treated as time-agnostic; a missing attribute
            means time-conditioned unless ``time_agnostic=True`` is passed.
        schedule: a scalar schedule or a per-token one (GenMD4, needs ``vocab_size`` equal).
        sampler: ``"ancestral"`` (:func:`ancestral_step`) or ``"mean"`` (:func:`mean_step`,
            scalar schedules only).
        temperature, top_k, top_p: applied to the logits before each step.
        precision: ``"float64"`` exact draws; ``"float32"`` the reference float32 Gumbel-max.
        cache: reuse the previous denoiser output when no token changed since it was computed:
            True (raises ValueError for a time-conditioned denoiser), False, or ``"auto"``
            (cache exactly when the denoiser is time-agnostic).
        cache_scope: ``"batch"`` calls the network on the whole batch whenever any sequence
            changed; ``"row"`` re-evaluates only the sequences that changed.
        lazy: skip the denoiser when the float64 ancestral step can tell without μ that no
            position unmasks (exact for any denoiser).
        fixed: (B or 1, L) token ids at fixed positions, ``FREE`` (-1) or the mask id elsewhere.
        device: where to sample; default the denoiser's parameter device, else CPU. The
            generator must live on the same device type.
        progress: show a tqdm progress bar.
        return_info: also return a :class:`SampleInfo` (call counts, masks per step, grid).
        record_every: with ``return_info``, record z every this many steps (and the last).
        on_step: called as ``on_step(step, z)`` with the state z (B, L) (mask id V at masked
            positions) before the first step (0) and after each step; for live displays. It must
            not modify z; an exception it raises stops sampling and propagates.

    Returns:
        LongTensor (batch_size, length) with tokens in [0, vocab_size), or (tokens, info).
    """
    use_cache, dev = _check_sample_args(
        denoiser, schedule, batch_size=batch_size, length=length, vocab_size=vocab_size, num_steps=num_steps,
        sampler=sampler, temperature=temperature, top_k=top_k, top_p=top_p, precision=precision, cache=cache,
        cache_scope=cache_scope, time_agnostic=time_agnostic, generator=generator, device=device,
        return_info=return_info, record_every=record_every,
    )
    times = (time_grid(num_steps, grid) if isinstance(grid, str) else _check_grid(grid, num_steps)).to(dev)
    sched = _prepare_schedule(schedule, torch.float64, dev)
    b, l, v = batch_size, length, vocab_size
    fix = _prepare_fixed(fixed, b, l, v, dev)

    info = SampleInfo(num_steps, times=times.detach().cpu(), batch_size=b, vocab_size=v, record_every=record_every)
    denoise = _DenoiserCalls(denoiser, b, l, v, use_cache=use_cache, cache_scope=cache_scope, device=dev)
    step_fn = ancestral_step if sampler == "ancestral" else mean_step
    draw: dict[str, Any] = dict(
        generator=generator, precision=precision, temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=v
    )
    # Only the float64 ancestral step can decide without μ; the others get the logits up front.
    lazy_logits = lazy and sampler == "ancestral" and precision == "float64"
    z = torch.full((b, l), v, dtype=torch.long, device=dev)
    if fix is not None:
        z = torch.where(fix >= 0, fix, z)
    info.record(0, z)
    if on_step is not None:
        on_step(0, z)

    steps: Any = range(num_steps)
    if progress:
        from tqdm.auto import tqdm  # imported on use: no import-time cost

        steps = tqdm(steps, desc="sampling", unit="step")
    with torch.no_grad():
        alphas = _GridAlphas(sched, times, v)
        for i in steps:
            requests = denoise.requests
            source: LogitsSource = (lambda z_=z, t_=times[i]: denoise(z_, t_))
            if not lazy_logits:
                source = source()
            z_new = step_fn(z, source, alphas[i], alphas[i + 1], **draw)  # α in float64 for either precision
            if denoise.requests == requests:
                info.lazy_skips += 1
            denoise.changed(z, z_new)
            z = z_new
            info.record(i + 1, z)
            if on_step is not None:
                on_step(i + 1, z)

        leftover = z == v
        info.leftover_masks = int(leftover.sum())
        if info.leftover_masks:
            z = torch.where(leftover, denoise(z, times[-1]).argmax(-1), z)

    info.denoiser_calls, info.denoiser_rows, info.cache_hits = denoise.calls, denoise.rows, denoise.cache_hits
    info._finish()
    if fix is not None and not bool(((fix < 0) | (z == fix)).all()):  # pragma: no cover - invariant
        raise RuntimeError("internal error: a fixed token changed during sampling")
    return (z, info) if return_info else z
