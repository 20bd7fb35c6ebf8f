"""The samplers :func:`maskdiff.sample` knows, by name.

:func:`sampler_names` is what applications (the CLI, the server, the evaluation adapters) offer
users; :func:`maskdiff.sample` validates ``sampler=`` against it. Adding a sampler is one class in
its module (:mod:`maskdiff.sampling.base` says how) and one line in ``_SAMPLERS``. The classes are
imported on first use, so this module (and the names) costs nothing to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from maskdiff.sampling.base import Sampler

__all__ = ["sampler_names", "sampler_class", "get_sampler"]

#: name -> "module:Class", the default first.
_SAMPLERS: dict[str, str] = {
    "ancestral": "maskdiff.sampling.ancestral:Ancestral",
    "mean": "maskdiff.sampling.ancestral:Mean",
    "first-hitting": "maskdiff.sampling.continuous:FirstHitting",
    "genmd4-exact": "maskdiff.sampling.continuous:GenMD4Exact",
    "confidence": "maskdiff.sampling.ordered:ConfidenceOrder",
    "margin": "maskdiff.sampling.ordered:MarginOrder",
    "entropy": "maskdiff.sampling.ordered:EntropyOrder",
    "threshold": "maskdiff.sampling.ordered:Threshold",
    "entropy-bounded": "maskdiff.sampling.ordered:EntropyBounded",
    "remdm": "maskdiff.sampling.remdm:ReMDM",
}

#: Block generation (``block_length=B``) wraps whichever sampler was chosen (built with the other
#: options): this class is built as ``Blocks.from_options({"inner": sampler, "block_length": B})``
#: and is itself a Sampler.
_BLOCKS = "maskdiff.sampling.blocks:Blocks"


def sampler_names() -> tuple[str, ...]:
    """The names accepted by ``maskdiff.sample(..., sampler=NAME)``, the default first."""
    return tuple(_SAMPLERS)


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def sampler_class(name: str) -> type["Sampler"]:
    """The class registered as ``name``; ValueError (one line, listing the names) if there is none."""
    if not isinstance(name, str) or name not in _SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(map(repr, _SAMPLERS))}, got {name!r}")
    return _load(_SAMPLERS[name])


def get_sampler(sampler: "str | Sampler", options: Mapping[str, Any] | None = None) -> "Sampler":
    """A sampler object from a registry name and its options, or the object itself (then without
    options). ``block_length`` (not None) wraps it for block generation (``_BLOCKS``)."""
    from maskdiff.sampling.base import Sampler, UnknownOption

    options = dict(options or {})
    block_length = options.pop("block_length", None)
    if isinstance(sampler, Sampler):
        if options:
            raise UnknownOption(f"options {', '.join(sorted(options))} were given with a sampler object; "
                                f"pass them to its constructor ({type(sampler).__name__}(...)) or use its name")
        obj = sampler
    else:
        obj = sampler_class(sampler).from_options(options)
    if block_length is None:
        return obj
    try:
        blocks = _load(_BLOCKS)
    except (ImportError, AttributeError):
        raise ValueError("block generation (block_length) is not available in this version") from None
    return blocks.from_options({"inner": obj, "block_length": block_length})
