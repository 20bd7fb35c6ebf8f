"""Samplers for masked (absorbing-state) diffusion: MD4 ancestral sampling and its variants.

Conventions (docs/math.md, "Notation"): vocabulary ``{0, …, V-1}``, mask id ``m = V``, time 1 =
all masked, time 0 = clean. A *denoiser* (:class:`maskdiff.forward.Denoiser`) is any callable
``denoiser(z, t) -> logits`` with ``z`` a LongTensor (B, L) holding the mask id V at masked
positions, ``t`` a FloatTensor (B,), and logits (B, L, V); μ = softmax(logits) is its prediction
of the clean token at every position.

The ancestral step (docs/math.md, "Sampling" and "GenMD4")
----------------------------------------------------------
From time t to an earlier time s < t, every masked position independently becomes

    token j  with probability  μ_j · (α_{s,j} - α_{t,j}) / (1 - α_{t,j})          (j < V)
    m        with the remaining mass  1 - Σ_j μ_j (α_{s,j} - α_{t,j}) / (1 - α_{t,j})

and unmasked positions are copied ("carry-over"). For a scalar schedule α_{t,j} = α_t, the
remaining mass is (1 - α_s)/(1 - α_t); a per-token schedule (GenMD4) gives every token j its own
α_{t,j}. Both are one formula here: α is a tensor of shape (B, 1) (scalar) or (B, V) (per token).

Exact categorical draws
-----------------------
``precision="float64"`` (default) draws in two stages, which is the same law as one draw over
the V + 1 outcomes: first *unmask?* with probability P_u = Σ_j μ_j r_j (r_j the fraction above),
then the token j ∝ μ_j r_j, each by inverse CDF with a float64 uniform (53 random bits). Every
probability is represented to float64 rounding, including tokens whose probability μ_j r_j is
far below 2^-24 — the regime of a many-step sampler, where r is about 1/T per step.

In both precisions r is formed in float64 (from float64 α), and the masked positions are drawn in
chunks of about ``DRAW_CHUNK_ELEMENTS`` // V rows (same random numbers on the CPU, so the same
tokens); logits that leave no token to draw (NaN, +inf, all -inf) raise ValueError.

``precision="float32"`` reproduces the reference code's draw: ``argmax(log p + g)`` with Gumbel
noise ``g = -log(-log u)`` from a float32 uniform u clipped to ``[tiny, 1 - 2^-24]``. The largest
float32 below 1 is 1 - 2^-24, so g ≤ -log(-log(1 - 2^-24)) ≈ 16.64 (and g ≥ -log(-log(2^-24))
≈ -2.81 except when u = 0): an outcome whose log-probability lies more than about 16.6 below the
competing outcomes' is drawn less often than it should be, or never. That truncates the tail
of the distribution and lowers the effective temperature (Zheng et al., arXiv 2409.02908). (The
JAX reference draws 23-bit uniforms, so its cap is even lower, 23·ln 2 ≈ 15.9.)

Calls to the denoiser
---------------------
* *Lazy evaluation* (``lazy=True``, default, exact for any denoiser): the float64 ancestral step
  first draws which positions unmask; since P_u ≤ max_j r_j, when no uniform falls below
  max_j r_j nothing can change and the denoiser is not called at all. For scalar schedules
  this decides the step exactly without μ.
* *Caching* (``cache=True``, only for time-agnostic denoisers): the output of a denoiser that
  ignores t depends on z alone, so when no token changed since the last call, the previous
  output is reused (docs/math.md, "Caching for time-agnostic denoisers"). ``cache_scope="row"``
  re-evaluates only the sequences that changed (bitwise equal to a full call only if the
  network's output for a row does not depend on the batch it is computed in).

Both only skip calls; the random numbers consumed do not depend on them, so samples with the
same generator are identical with and without either.

Conditioning
------------
``fixed`` (LongTensor (B or 1, L)) holds a token id at every fixed position and ``FREE`` (-1) or
the mask id at free positions. Fixed tokens start unmasked and are never changed. Helpers:
:func:`make_fixed` (prompt prefix, suffix, arbitrary positions) and :func:`fixed_from_template`
("the ___ sat on the ___" with gaps of a given number of tokens).

Samplers
--------
:func:`sample` runs one of the samplers named by :func:`sampler_names` (docs/samplers.md: which
are exact, what each preserves, their knobs and network calls). :mod:`~maskdiff.sampling.base`
defines the interface (:class:`Sampler`) and says how to add one; :mod:`~maskdiff.sampling.registry`
names them.

Modules
-------
:mod:`~maskdiff.sampling.categorical` (logit transforms, exact and float32 draws),
:mod:`~maskdiff.sampling.steps` (time grids, α, the reverse step),
:mod:`~maskdiff.sampling.conditioning` (fixed positions), :mod:`~maskdiff.sampling.context`
(:class:`SamplingContext`, :class:`SampleInfo`, the counted denoiser),
:mod:`~maskdiff.sampling.base` (:class:`Sampler`), :mod:`~maskdiff.sampling.registry`,
:mod:`~maskdiff.sampling.sampler` (:func:`sample`), the samplers by family:
:mod:`~maskdiff.sampling.ancestral` (``ancestral``, ``mean``), :mod:`~maskdiff.sampling.continuous`
(``first-hitting``, ``genmd4-exact``: exact continuous-time), :mod:`~maskdiff.sampling.ordered`,
:mod:`~maskdiff.sampling.remdm`, :mod:`~maskdiff.sampling.blocks` (approximate samplers).
:mod:`maskdiff.sampling.cuda_graph` (``GraphDenoiser``, a bf16 denoiser replayed from a CUDA
graph) is not imported here: import it by its module path.
"""

from maskdiff.forward import Denoiser
from maskdiff.sampling.base import Sampler, UnknownOption
from maskdiff.sampling.categorical import (
    FLOAT32_GUMBEL_MAX,
    Precision,
    _check_precision,
    _check_transform_args,
    _inverse_cdf,
    _mu64,
    _softmax,
    gumbel_max_float32,
    sample_categorical,
    transform_logits,
)
from maskdiff.sampling.conditioning import FREE, _as_token_rows, _prepare_fixed, fixed_from_template, make_fixed
from maskdiff.sampling.context import SamplingContext
from maskdiff.sampling.registry import get_sampler, sampler_class, sampler_names
from maskdiff.sampling.sampler import (
    SampleInfo,
    _check_sample_args,
    _DenoiserCalls,
    _is_time_agnostic,
    _module_device,
    _owner,
    _prepare_schedule,
    sample,
)
from maskdiff.sampling.steps import (
    LogitsSource,
    _check_grid,
    _resolve_logits,
    _rowwise_alpha,
    _step_setup,
    ancestral_step,
    mean_step,
    time_grid,
    unmask_probability,
    vocab_alpha,
)

__all__ = [
    "FREE",
    "FLOAT32_GUMBEL_MAX",
    "Denoiser",
    "SampleInfo",
    "time_grid",
    "vocab_alpha",
    "unmask_probability",
    "transform_logits",
    "sample_categorical",
    "gumbel_max_float32",
    "ancestral_step",
    "mean_step",
    "make_fixed",
    "fixed_from_template",
    "sample",
    "sampler_names",
    "sampler_class",
    "get_sampler",
    "Sampler",
    "SamplingContext",
    "UnknownOption",
]
