"""The samplers :func:`maskdiff.sample` knows, by name.

:func:`sampler_names` is what applications (the CLI, the server, the evaluation adapters) offer
users; :func:`maskdiff.sample` validates ``sampler=`` against it.
"""

from __future__ import annotations

__all__ = ["sampler_names"]

_NAMES: tuple[str, ...] = ("ancestral", "mean")


def sampler_names() -> tuple[str, ...]:
    """The names accepted by ``maskdiff.sample(..., sampler=NAME)``, the default first."""
    return _NAMES
