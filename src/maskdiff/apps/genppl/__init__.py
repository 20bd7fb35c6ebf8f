"""Sample quality: generative perplexity under a causal language model, next to sample entropy.

Generative perplexity (gen PPL) is the perplexity of a model's *samples* under a separate,
fixed causal language model (the *scorer*). On its own it rewards dull text: a sampler that
lowers the effective temperature (e.g. the float32 Gumbel truncation, docs/math.md, "Exact
(float64) categorical draws" under "Sampling"; Zheng et al., arXiv 2409.02908) gets a better
gen PPL with less varied samples. So every result here carries, next to the gen PPL, the
samples' unigram entropy, the sampler settings, the categorical precision and the scoring
model's label.

The app has two parts:

* :mod:`~maskdiff.apps.genppl.scorers`: the scoring models (GPT-2 Large, the offline
  SmolLM2-135M GGUF, ``"auto"``), found, converted, cached and loaded — the part that depends
  on the environment.
* :mod:`~maskdiff.apps.genppl.quality`: which tokens are scored, the token-weighted NLL with
  its ratio-estimator interval, unigram entropy, samples and data from a run, the table, and
  the body of ``maskdiff genppl``.
"""

from __future__ import annotations

from maskdiff.apps.genppl.quality import (
    format_quality_table,
    generative_perplexity,
    reference_quality,
    run_genppl,
    sample_quality,
    unigram_entropy,
)
from maskdiff.apps.genppl.scorers import (
    SCORER_NAMES,
    Scorer,
    ScorerUnavailable,
    load_scorer,
    smollm2_gguf_path,
)

__all__ = [
    "Scorer",
    "ScorerUnavailable",
    "SCORER_NAMES",
    "load_scorer",
    "smollm2_gguf_path",
    "generative_perplexity",
    "unigram_entropy",
    "sample_quality",
    "reference_quality",
    "format_quality_table",
    "run_genppl",
]
