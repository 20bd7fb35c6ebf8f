"""maskdiff: masked (absorbing-state) discrete diffusion — MD4 and GenMD4 in PyTorch."""

from maskdiff.schedules import Schedule, get_schedule

__version__ = "0.1.0"

__all__ = ["Schedule", "get_schedule", "__version__"]
