"""maskdiff: masked (absorbing-state) discrete diffusion — MD4 and GenMD4 in PyTorch."""

from maskdiff import metrics
from maskdiff.losses import genmd4_losses, md4_loss_terms, md4_nelbo
from maskdiff.schedules import GenMD4Schedule, Schedule, get_schedule

__version__ = "0.1.0"

__all__ = [
    "GenMD4Schedule",
    "Schedule",
    "genmd4_losses",
    "get_schedule",
    "md4_loss_terms",
    "md4_nelbo",
    "metrics",
    "__version__",
]
