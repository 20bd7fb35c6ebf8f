"""Training: the recipe (:mod:`.trainer`), its data and randomness streams (:mod:`.streams`),
data parallelism (:mod:`.distributed`) and the exponential moving average (:mod:`.ema`).

``maskdiff train`` calls :func:`train`; tests and scripts may drive a :class:`Trainer` step by step.
:class:`TrainingDiverged` (exit code 1) and :class:`TrainingInterrupted` (Ctrl-C, exit code 130)
are how a run that could not finish stops: one line saying which checkpoint to resume from.
"""

from maskdiff.training.guard import TrainingDiverged, TrainingInterrupted
from maskdiff.training.trainer import Trainer, learning_rate, train

__all__ = ["Trainer", "learning_rate", "train", "TrainingDiverged", "TrainingInterrupted"]
