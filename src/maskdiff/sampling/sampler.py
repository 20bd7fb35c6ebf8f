"""The one entry point :func:`sample`: checks, the shared context, dispatch to a sampler.

:func:`sample` checks its arguments (:func:`_check_sample_args`), resolves ``sampler=`` (a
registry name with its ``**options``, or a :class:`~maskdiff.sampling.base.Sampler` object),
builds one :class:`~maskdiff.sampling.context.SamplingContext` and runs the sampler on it. Its
calls to the denoiser go through :class:`~maskdiff.sampling.context._DenoiserCalls`, which counts
them, checks the logits and, for a time-agnostic denoiser, reuses the previous output while no
token changed (docs/math.md, "Caching for time-agnostic denoisers"). :class:`SampleInfo` is what
it reports.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Literal, Mapping

import torch
from torch import Tensor, nn

from maskdiff.forward import Denoiser
from maskdiff.sampling.base import Sampler
from maskdiff.sampling.categorical import Precision, _check_precision, _check_transform_args
from maskdiff.sampling.conditioning import _prepare_fixed
from maskdiff.sampling.context import SampleInfo, SamplingContext, _DenoiserCalls
from maskdiff.sampling.registry import get_sampler
from maskdiff.sampling.steps import LogitsSource, _check_grid, ancestral_step, mean_step, time_grid, vocab_alpha
from maskdiff.schedules import Schedule

__all__ = ["SampleInfo", "SamplingContext", "sample"]


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


def _grid_loop(ctx: SamplingContext, kind: Literal["ancestral", "mean"]) -> None:
    """One :func:`ancestral_step` or :func:`mean_step` per grid interval, then the leftover fill
    (0.1's loop, unchanged). Only the float64 ancestral step can decide without μ (lazy
    evaluation: it gets a callable for the logits); the others get the logits up front.
    """
    step_fn = ancestral_step if kind == "ancestral" else mean_step
    lazy = ctx.lazy and kind == "ancestral" and ctx.precision == "float64"
    alphas = ctx.grid_alphas()
    times, z = ctx.times, ctx.z
    for i in ctx.steps(ctx.num_steps):
        requests = ctx.calls.requests
        source: LogitsSource = (lambda z_=z, t_=times[i]: ctx.denoise(z_, t_))
        if not lazy:
            source = source()
        z_new = step_fn(z, source, alphas[i], alphas[i + 1], **ctx.draw)  # α in float64 for either precision
        if ctx.calls.requests == requests:
            ctx.info.lazy_skips += 1
        z = ctx.advance(z_new, i + 1)
    ctx.fill_leftover(times[-1])


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
    sampler: str | Sampler,
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
    options: Mapping[str, Any] | None = None,
) -> tuple[bool, torch.device]:
    """Check :func:`sample`'s arguments (same names) and resolve the cache setting and the device.

    Raises ValueError naming the first bad argument, in signature order (``sampler`` with its
    ``options``: :func:`~maskdiff.sampling.registry.get_sampler`; an unknown option is a
    TypeError), then the combinations: a schedule the sampler cannot use (``sampler="mean"``
    with a per-token schedule), ``cache=True`` or ``time_agnostic=True`` with a
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
    sampler_obj = get_sampler(sampler, options)
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
    sampler_obj.check_schedule(schedule)
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
    sampler: str | Sampler = "ancestral",
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
    **options: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """Generate ``batch_size`` sequences of ``length`` tokens with the MD4/GenMD4 reverse process.

    Starts from all masks (except ``fixed`` positions) at t = 1 and runs the sampler. The default,
    ``ancestral``, applies ``num_steps`` steps along the time grid (``"cosine"``, ``"uniform"``,
    or a strictly decreasing tensor of T + 1 times); masks left after the last step are filled
    with the argmax of one more denoiser call at the last grid time (0 for the built-in grids).
    Other samplers (``maskdiff.sampling.sampler_names()``, docs/samplers.md) say in their
    docstrings how they use the grid (gridless ones ignore ``num_steps`` and ``grid``).

    Args:
        denoiser: ``denoiser(z (B, L) long, t (B,) float32) -> logits (B, L, V)``. If it (or,
            for a bound method such as ``model.denoiser``, its owner) has
            ``time_conditioning = False`` it is treated as time-agnostic; a missing attribute
            means time-conditioned unless ``time_agnostic=True`` is passed.
        schedule: a scalar schedule or a per-token one (GenMD4, needs ``vocab_size`` equal).
        sampler: a registry name (:func:`~maskdiff.sampling.registry.sampler_names`: ``"ancestral"``,
            the default, ``"mean"``, ``"first-hitting"``, ``"genmd4-exact"``, ...), or a
            :class:`~maskdiff.sampling.base.Sampler` object (then no ``options``).
        options: the named sampler's options (docs/samplers.md); an unknown one is a TypeError.
            ``block_length=B`` generates in blocks of B positions with that sampler.
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
        return_info=return_info, record_every=record_every, options=options,
    )
    runner = get_sampler(sampler, options)
    times = (time_grid(num_steps, grid) if isinstance(grid, str) else _check_grid(grid, num_steps)).to(dev)
    sched = _prepare_schedule(schedule, torch.float64, dev)
    b, l, v = batch_size, length, vocab_size
    fix = _prepare_fixed(fixed, b, l, v, dev)

    info = SampleInfo(num_steps, times=times.detach().cpu(), batch_size=b, vocab_size=v, record_every=record_every,
                      sampler=runner.name, sampler_options=runner.options())
    denoise = _DenoiserCalls(denoiser, b, l, v, use_cache=use_cache, cache_scope=cache_scope, device=dev)
    z = torch.full((b, l), v, dtype=torch.long, device=dev)
    if fix is not None:
        z = torch.where(fix >= 0, fix, z)
    ctx = SamplingContext(
        calls=denoise, schedule=sched, z=z, free=z == v, fixed=fix, vocab_size=v, num_steps=num_steps, times=times,
        generator=generator, temperature=temperature, top_k=top_k, top_p=top_p, precision=precision, lazy=lazy,
        progress=progress, info=info, grid_alphas=lambda: _GridAlphas(sched, times, v), on_step=on_step,
    )
    info.record(0, z)
    if on_step is not None:
        on_step(0, z)
    with torch.no_grad():
        runner.run(ctx)
    z = ctx.z

    info.denoiser_calls, info.denoiser_rows, info.cache_hits = denoise.calls, denoise.rows, denoise.cache_hits
    info._finish()
    if fix is not None and not bool(((fix < 0) | (z == fix)).all()):  # pragma: no cover - invariant
        raise RuntimeError(f"internal error: a fixed token changed during sampling ({runner.name})")
    if bool((z == v).any()):  # pragma: no cover - invariant
        raise RuntimeError(f"internal error: the {runner.name!r} sampler left masked positions")
    return (z, info) if return_info else z
