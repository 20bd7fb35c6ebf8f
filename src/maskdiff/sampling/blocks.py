"""Block generation and sliding windows: long or left-to-right texts with any sampler inside.

Blocks (LLaDA style, ``block_length=B``)
----------------------------------------
``maskdiff.sample(..., sampler=NAME, block_length=B)`` splits the L positions into blocks
[0, B), [B, 2B), … and generates them left to right with the sampler NAME inside each block
(:class:`Blocks`). While block j is generated, the blocks before it are finished (the network
sees their tokens), the positions to its right stay masked (the network sees masks there, and
fixed tokens such as a suffix) and are never unmasked, and only block j's free positions change.
A block without a free position (e.g. all prompt) is skipped.

Steps: the ``num_steps`` of a grid sampler are split over the blocks that have free positions,
⌊T/n⌋ each and one more for the first T mod n (T ≥ n is required). Each block runs its own grid
from t = 1 to 0 with its T_j steps: the requested grid (T + 1 times) resampled at T_j + 1 evenly
spaced positions of its index (exactly every (T/T_j)-th time when T_j divides T, linear
interpolation otherwise), so a ``"cosine"`` grid stays cosine-shaped in every block. Gridless
samplers (``first-hitting``, ``threshold``, ...) run until the block is unmasked.

Approximate by design: the model is asked for the joint law block by block (the chain rule from
left to right) instead of in any order. For a denoiser with exact conditionals and an exact
sampler inside, this is still exact; for a learned model it is another approximation of the joint.

Sliding windows (MDLM-style semi-autoregressive, :func:`sample_long`)
---------------------------------------------------------------------
A length beyond the model's sequence length W is generated window by window: the first window is
positions [0, W); each next window starts ``context`` positions before the end of what is
generated so far (those tokens are its prompt: fixed tokens of the window) and generates the
W − ``context`` positions after them; the last window is moved left to end exactly at the
requested length (so it may have more context). Every window is one :func:`maskdiff.sample` call
with any sampler and options (``block_length`` too); fixed tokens of the whole text (a prompt,
a suffix) are fixed in every window that covers them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from maskdiff.forward import Denoiser
from maskdiff.sampling.base import Sampler
from maskdiff.sampling.conditioning import FREE, _prepare_fixed
from maskdiff.sampling.context import SampleInfo, SamplingContext
from maskdiff.sampling.sampler import _GridAlphas, sample
from maskdiff.schedules import Schedule

__all__ = ["Blocks", "block_grid", "block_steps", "window_spans", "sample_long"]


def block_steps(num_steps: int, num_blocks: int) -> list[int]:
    """``num_steps`` split over ``num_blocks``: ⌊T/n⌋ each, one more for the first T mod n."""
    if num_steps < num_blocks:
        raise ValueError(f"block generation needs num_steps ≥ the number of blocks to generate ({num_blocks}), "
                         f"got num_steps={num_steps}: pass more steps or a larger block_length")
    base, extra = divmod(num_steps, num_blocks)
    return [base + (1 if j < extra else 0) for j in range(num_blocks)]


def block_grid(times: Tensor, steps: int) -> Tensor:
    """The grid ``times`` (T + 1,) resampled to ``steps`` + 1 times at evenly spaced index positions
    j·T/steps (linear interpolation between neighbours; exact grid points when steps divides T).
    Keeps the first and last time and strict decrease."""
    total = times.numel() - 1
    pos = torch.arange(steps + 1, dtype=torch.float64, device=times.device) * (total / steps)
    lo = pos.floor().long().clamp(max=total)
    hi = (lo + 1).clamp(max=total)
    w = (pos - lo.to(torch.float64)).to(times.dtype)
    out = times[lo] * (1 - w) + times[hi] * w
    out[0], out[-1] = times[0], times[-1]
    return out


@dataclass
class _BlockContext(SamplingContext):
    """The context of one block: ``free`` narrowed to the block, its own grid; steps are recorded
    in the whole run's numbering (``step_offset``), and only the final block's last step is last."""

    step_offset: int = 0
    final_block: bool = False
    steps_taken: int = 0

    def advance(self, z_new: Tensor, step: int, *, last: bool | None = None) -> Tensor:
        last_here = (step == self.num_steps) if last is None else last
        self.steps_taken = max(self.steps_taken, step)
        return super().advance(z_new, self.step_offset + step, last=bool(last_here and self.final_block))


@dataclass(frozen=True)
class Blocks(Sampler):
    """Left-to-right block generation with ``inner`` inside each block (module docstring). Built by
    ``maskdiff.sample(..., sampler=NAME, block_length=B)`` or ``Blocks(inner=Confidence(), block_length=B)``."""

    name: ClassVar[str] = "blocks"
    exact: ClassVar[bool] = False
    preserves: ClassVar[str] = ("the inner sampler's law inside each block given the blocks before it; changes "
                                "the order: left to right, block by block, the positions to the right kept masked")
    calls: ClassVar[str] = "the inner sampler's calls, summed over the blocks (num_steps is split over them)"

    inner: Any = field(default=None, metadata={"help": "the sampler used inside each block (a Sampler object)"})
    block_length: int = field(default=32, metadata={"help": "B ≥ 1: positions per block, generated left to right"})

    def validate(self) -> None:
        self.require(isinstance(self.inner, Sampler) and not isinstance(self.inner, Blocks),
                     f"inner must be a (non-block) Sampler object, got {self.inner!r}")
        self.require(self.block_length >= 1, f"block_length must be ≥ 1, got {self.block_length}")

    def options(self) -> dict[str, Any]:
        return {"block_length": self.block_length, "inner": self.inner.name, "inner_options": self.inner.options()}

    def check_schedule(self, schedule: Schedule) -> None:
        self.inner.check_schedule(schedule)

    def run(self, ctx: SamplingContext) -> None:
        free, length, b = ctx.free, ctx.length, self.block_length
        spans = [(s, min(s + b, length)) for s in range(0, length, b) if bool(free[:, s:min(s + b, length)].any())]
        if not spans:
            return
        grid = self.inner.uses_grid
        steps = block_steps(ctx.num_steps, len(spans)) if grid else [ctx.num_steps] * len(spans)
        base = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(SamplingContext) if f.init}
        offset, leftover = 0, 0
        for j, ((s, e), t_j) in enumerate(zip(spans, steps)):
            in_block = torch.zeros(length, dtype=torch.bool, device=ctx.device)
            in_block[s:e] = True
            times = block_grid(ctx.times, t_j) if grid else ctx.times
            sub = _BlockContext(**{**base, "z": ctx.z, "free": free & in_block, "num_steps": t_j, "times": times,
                                   "grid_alphas": (lambda tt=times: _GridAlphas(ctx.schedule, tt, ctx.vocab_size))},
                                step_offset=offset, final_block=j == len(spans) - 1)
            self.inner.run(sub)
            ctx.z = sub.z
            leftover += ctx.info.leftover_masks
            ctx.info.leftover_masks = 0
            offset += sub.steps_taken
        ctx.info.leftover_masks = leftover
        ctx.info.num_steps = offset
        ctx.info.extras["blocks"] = [[s, e] for s, e in spans]


# --------------------------------------------------------------------------------------------
# Sliding windows beyond the model's length
# --------------------------------------------------------------------------------------------


def window_spans(length: int, window: int, context: int) -> list[tuple[int, int]]:
    """The windows [start, end) of :func:`sample_long`: [0, W), then each starting ``context``
    before the previous end, the last one moved left to end at ``length``."""
    if length <= window:
        return [(0, length)]
    if not 0 <= context < window:
        raise ValueError(f"context must lie in [0, window) = [0, {window}), got {context}")
    spans = [(0, window)]
    while spans[-1][1] < length:
        start = spans[-1][1] - context
        spans.append((start, start + window) if start + window <= length else (length - window, length))
    return spans


def sample_long(
    denoiser: Denoiser,
    schedule: Schedule,
    *,
    batch_size: int,
    length: int,
    window: int,
    vocab_size: int,
    context: int | None = None,
    fixed: Tensor | None = None,
    progress: bool = False,
    return_info: bool = False,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """Generate ``length`` tokens with a denoiser that takes at most ``window`` positions, by sliding
    windows (module docstring). ``length`` ≤ ``window`` is one ordinary :func:`maskdiff.sample` call.

    Args:
        window: W, the model's sequence length; each call sees exactly W positions.
        context: tokens of the text so far that prompt the next window (default W // 2); each
            window after the first generates W − context new positions (the last one fewer).
        fixed: (B or 1, length) fixed tokens of the whole text (``FREE``/mask id elsewhere).
        kwargs: the rest of :func:`maskdiff.sample`'s arguments (num_steps, sampler and its
            options, generator, temperature, device, ...), used in every window; ``num_steps`` is
            per window.

    Returns:
        (batch_size, length) tokens, or (tokens, info) with one :class:`SampleInfo` summing the
        windows' calls and steps (``extras["windows"]``: the [start, end) of each call).
    """
    for name, val in (("length", length), ("window", window), ("batch_size", batch_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    context = window // 2 if context is None else context
    spans = window_spans(length, window, context)
    fix = _prepare_fixed(fixed, batch_size, length, vocab_size, torch.device("cpu"))
    out = torch.full((batch_size, length), FREE, dtype=torch.long) if fix is None else fix.cpu().clone()
    total = SampleInfo(0, batch_size=batch_size, vocab_size=vocab_size, extras={"windows": [list(s) for s in spans]})
    device, bar = None, None
    if progress and len(spans) > 1:
        from tqdm.auto import tqdm  # imported on use

        bar = tqdm(total=len(spans), desc="windows", unit="window")
    for start, end in spans:
        w_fixed = out[:, start:end]
        if bool((w_fixed >= 0).all()):  # nothing left to generate here
            continue
        z, info = sample(denoiser, schedule, batch_size=batch_size, length=end - start, vocab_size=vocab_size,
                         fixed=w_fixed, progress=progress and bar is None, return_info=True, **kwargs)
        out[:, start:end], device = z.cpu(), z.device
        for key in ("num_steps", "denoiser_calls", "denoiser_rows", "cache_hits", "lazy_skips", "leftover_masks"):
            setattr(total, key, getattr(total, key) + getattr(info, key))
        total.sampler, total.sampler_options = info.sampler, info.sampler_options
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    tokens = out if device is None else out.to(device)
    return (tokens, total) if return_info else tokens

