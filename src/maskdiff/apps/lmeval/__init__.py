"""maskdiff models in EleutherAI's lm-evaluation-harness (``pip install 'maskdiff[lmeval]'``).

* :mod:`~maskdiff.apps.lmeval.estimators` — log p(continuation | context) of a run: the negative
  ELBO with the context held fixed (K variance-reduced Monte Carlo draws with their standard error),
  the exact left-to-right order, the AR baseline's exact likelihood; no harness import.
* :mod:`~maskdiff.apps.lmeval.text` — the run's tokenizer for harness text (character runs:
  text8 normalisation), and how requests become windows of the model's length (rolling windows).
* :mod:`~maskdiff.apps.lmeval.model` — :class:`MaskdiffLM`, the harness model, registered as
  ``"maskdiff"`` when this package is imported.
* :mod:`~maskdiff.apps.lmeval.report` — :func:`run_lm_eval` (``maskdiff lm-eval``) and the Monte
  Carlo summary written next to the harness's results.

``python -m maskdiff.apps.lmeval run --model maskdiff --model_args run=RUN ...`` is the harness's
own command line with the model registered. The estimators and the report import without the
harness; :class:`MaskdiffLM` needs it (docs/lm-eval.md).
"""

from maskdiff.apps.lmeval.estimators import ESTIMATORS, LIKELIHOODS, Estimate, LikelihoodEstimator, Window
from maskdiff.apps.lmeval.report import mc_summary, run_lm_eval
from maskdiff.apps.lmeval.text import TextCodec, pair_windows, rolling_windows

try:  # registers the model with the harness, when it is installed
    from maskdiff.apps.lmeval.model import MaskdiffLM
except ImportError:  # pragma: no cover - the harness is an optional extra
    MaskdiffLM = None  # type: ignore[assignment,misc]

__all__ = ["ESTIMATORS", "LIKELIHOODS", "Estimate", "LikelihoodEstimator", "Window", "MaskdiffLM", "TextCodec",
           "mc_summary", "pair_windows", "rolling_windows", "run_lm_eval"]
