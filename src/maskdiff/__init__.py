"""maskdiff: masked (absorbing-state) discrete diffusion — MD4 and GenMD4 in PyTorch.

Public entry points:

* :func:`get_schedule` — masking schedules (linear, cosine, polynomial, geometric, genmd4);
* :func:`md4_nelbo`, :func:`md4_loss_terms`, :func:`genmd4_losses` — training objectives;
* :func:`sample` — the MD4/GenMD4 ancestral sampler;
* :func:`load` — rebuild a trained model from its run folder.
"""

from maskdiff import metrics
from maskdiff._version import __version__
from maskdiff.losses import genmd4_losses, md4_loss_terms, md4_nelbo
from maskdiff.runs import load
from maskdiff.sampling import sample
from maskdiff.schedules import GenMD4Schedule, Schedule, get_schedule

__all__ = [
    "GenMD4Schedule",
    "Schedule",
    "genmd4_losses",
    "get_schedule",
    "load",
    "md4_loss_terms",
    "md4_nelbo",
    "metrics",
    "sample",
    "__version__",
]
