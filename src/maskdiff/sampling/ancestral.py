"""The grid samplers of 0.1: ``ancestral`` (the default) and ``mean``.

Both apply one reverse step per interval of the time grid (``num_steps`` intervals, ``grid``
``"cosine"``/``"uniform"`` or a tensor) and fill masks left after the last step with the argmax
of one more denoiser call at the last grid time (docs/math.md, "Sampling"). Their random streams
and results are those of 0.1 bit for bit. The loop is :func:`maskdiff.sampling.sampler._grid_loop`
(it looks the step functions up in that module, where tests and benchmarks replace them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from maskdiff.sampling.base import Sampler
from maskdiff.sampling.context import SamplingContext
from maskdiff.sampling.sampler import _grid_loop
from maskdiff.schedules import Schedule

__all__ = ["Ancestral", "Mean"]


@dataclass(frozen=True)
class Ancestral(Sampler):
    """The MD4/GenMD4 ancestral sampler (:func:`~maskdiff.sampling.steps.ancestral_step` per grid
    interval): exact for the discrete-time model with T steps, scalar or per-token schedules.

    With ``lazy`` (and float64 draws) a step whose uniforms show that nothing can unmask does not
    call the denoiser (``SampleInfo.lazy_skips``).
    """

    name: ClassVar[str] = "ancestral"
    exact: ClassVar[bool] = True
    preserves: ClassVar[str] = ("the discrete-time model with T steps (its own law, exactly); "
                                "tends to the continuous-time model as T grows")
    calls: ClassVar[str] = "≤ num_steps (+1 if masks are left; fewer with lazy evaluation or caching)"

    def run(self, ctx: SamplingContext) -> None:
        _grid_loop(ctx, "ancestral")


@dataclass(frozen=True)
class Mean(Sampler):
    """The "mean" variant (:func:`~maskdiff.sampling.steps.mean_step`): draw x̂ ~ μ at every masked
    position, then unmask with probability r. Same law as ``ancestral`` per step for scalar
    schedules (another random stream); refuses per-token schedules."""

    name: ClassVar[str] = "mean"
    exact: ClassVar[bool] = True
    preserves: ClassVar[str] = "the same discrete-time law as ancestral (scalar schedules), another random stream"
    calls: ClassVar[str] = "≤ num_steps (+1 if masks are left; fewer with caching)"

    def check_schedule(self, schedule: Schedule) -> None:
        if bool(getattr(schedule, "per_token", False)):
            raise ValueError(
                "the 'mean' sampler needs a scalar schedule: with a per-token schedule (GenMD4) the "
                "unmasking probability depends on the token; use sampler='ancestral'"
            )

    def run(self, ctx: SamplingContext) -> None:
        _grid_loop(ctx, "mean")
