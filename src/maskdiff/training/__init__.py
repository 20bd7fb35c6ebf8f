"""Training: the recipe (:mod:`.trainer`), its data and randomness streams (:mod:`.streams`),
data parallelism (:mod:`.distributed`) and the exponential moving average (:mod:`.ema`).

``maskdiff train`` calls :func:`train`; tests and scripts may drive a :class:`Trainer` step by step.
"""

from maskdiff.training.trainer import Trainer, learning_rate, train

__all__ = ["Trainer", "learning_rate", "train"]
