"""The sampler interface: :class:`Sampler`, the base class of every sampler ``maskdiff.sample`` knows.

A sampler is a small frozen dataclass. Its class attributes say what it is:

* ``name`` — the registry name (``maskdiff.sample(..., sampler=NAME)``, ``maskdiff sample --sampler NAME``);
* ``exact`` — True when it draws from the model's own distribution (the discrete-time model with
  T steps for ``ancestral``/``mean``, the continuous-time model for the gridless exact samplers),
  False when it changes the distribution, by design or for speed;
* ``preserves`` — one line: what it preserves and what it changes;
* ``calls`` — one line: how many network calls a sample costs;
* ``uses_grid`` — whether ``num_steps`` and ``grid`` mean anything to it (gridless samplers
  ignore them, though ``maskdiff.sample`` still checks them).

Its dataclass fields are its *options* (knobs), each with a default and a one-line
``metadata={"help": ...}``. Options are checked when the object is built: the field's type
(``int``, ``float``, ``bool``, ``str``, a ``Literal[...]`` of choices, or one of them ``| None``) by
this base class, ranges and combinations by the sampler's :meth:`Sampler.validate`; every error is
one line (``ValueError``; an unknown option is :class:`UnknownOption`, a ``TypeError``). A value
given as text (the command line's ``--sampler-option KEY=VALUE``) is converted by the field's type,
so a new sampler's knobs reach the command line with no change to the CLI.

Three ways to use one (all the same sampler)::

    maskdiff.sample(den, sched, ..., sampler="first-hitting")          # by name, default options
    maskdiff.sample(den, sched, ..., sampler="remdm", sigma=0.1)       # by name with options
    FirstHitting()(den, sched, batch_size=4, length=64, vocab_size=V, num_steps=1)   # as an object
    maskdiff.sample(den, sched, ..., sampler=FirstHitting())           # an object (no options then)

``maskdiff.sample`` builds one :class:`~maskdiff.sampling.context.SamplingContext` — the state z
(all masks except the fixed positions of a prompt, suffix or infilling template), the counted
and checked denoiser, the float64 schedule, the generator, temperature/top-k/top-p/precision,
the progress bar, the :class:`~maskdiff.sampling.context.SampleInfo` — and calls
``sampler.run(ctx)``. Afterwards it checks that no free position is masked and that no fixed
token changed, and fills in the call counts.

How to add a sampler
--------------------
1. In its module under ``maskdiff/sampling/`` (one module per family), write::

       @dataclass(frozen=True)
       class MySampler(Sampler):
           \"\"\"What it does, its law, its knobs; docs/math.md section if it has maths.\"\"\"

           name: ClassVar[str] = "my-sampler"
           exact: ClassVar[bool] = False
           preserves: ClassVar[str] = "the per-step token law; changes the order of unmasking"
           calls: ClassVar[str] = "num_steps"

           tau: float = field(default=0.9, metadata={"help": "confidence threshold τ in (0, 1]"})

           def validate(self) -> None:              # ranges, one line each
               self.require(0 < self.tau <= 1, f"tau must lie in (0, 1], got {self.tau}")

           def check_schedule(self, schedule) -> None:   # optional: refuse schedules it cannot use
               ...

           def run(self, ctx: SamplingContext) -> None:
               for i in ctx.steps(ctx.num_steps):
                   logits = ctx.denoise(ctx.z, ctx.times[i])      # counted, checked, cached
                   mu = ctx.mu(logits[ctx.masked()])              # float64, temperature/top-k/top-p applied
                   ...                                            # draws with ctx.generator only
                   ctx.advance(z_new, i + 1)                      # fixed positions are kept
               ctx.fill_leftover(ctx.times[-1])                   # if masks may remain

2. Add one line to ``_SAMPLERS`` in :mod:`maskdiff.sampling.registry` (name → "module:Class").

That is all: ``maskdiff.sample``, ``maskdiff sample --sampler my-sampler --sampler-option tau=0.8``,
the server and the evaluation adapters offer it, and ``tests/test_sampler_interface.py`` checks it
(terminates with no mask, fixed tokens kept, deterministic with a generator, calls counted).

Rules a sampler keeps: change only ``ctx.free`` positions (``advance`` enforces it), end with none
of them masked, draw random numbers only from ``ctx.generator``, get logits only through
``ctx.denoise`` (so calls are counted), record each step with ``advance`` and report anything else
in ``ctx.info`` (``proposals``/``rejected`` for thinning, ``extras`` for the rest, documented).
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Union

from maskdiff.sampling.context import SamplingContext
from maskdiff.schedules import Schedule

__all__ = ["Sampler", "UnknownOption"]


class UnknownOption(TypeError, ValueError):
    """An option the sampler does not have (a TypeError like any unexpected keyword, and a
    ValueError so that the command line reports it as bad input)."""


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Sampler:
    """Base class of the samplers; see the module docstring for the contract and how to add one."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    preserves: ClassVar[str] = ""
    calls: ClassVar[str] = ""
    uses_grid: ClassVar[bool] = True

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(self.name, f.name, getattr(self, f.name), hints.get(f.name, Any))
            object.__setattr__(self, f.name, value)
        self.validate()

    # -- what a sampler overrides --------------------------------------------------------------

    def validate(self) -> None:
        """Check the options' ranges and combinations (raise with :meth:`require`)."""

    def check_schedule(self, schedule: Schedule) -> None:
        """Raise ValueError (one line) if this sampler cannot use ``schedule``."""

    def run(self, ctx: SamplingContext) -> None:
        """Generate: leave ``ctx.z`` with no mask at a ``ctx.free`` position."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    # -- provided ------------------------------------------------------------------------------

    def require(self, condition: bool, message: str) -> None:
        """Raise ``ValueError("sampler 'NAME': message")`` unless ``condition``."""
        if not condition:
            raise ValueError(f"sampler {self.name!r}: {message}")

    def options(self) -> dict[str, Any]:
        """The option values, by name (recorded in ``SampleInfo.sampler_options`` and result files)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def option_help(cls) -> dict[str, str]:
        """One line per option: ``type, default: help``."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            out[f.name] = f"{_type_text(hints.get(f.name, Any))}, default {default!r}: {f.metadata.get('help', '')}"
        return out

    @classmethod
    def describe(cls) -> str:
        """A few lines for ``--sampler-option help``: what it is and its options."""
        lines = [f"{cls.name}: {'exact' if cls.exact else 'approximate'}; {cls.preserves}",
                 f"  network calls per sample: {cls.calls}"]
        options = cls.option_help()
        lines += [f"  {k}: {v}" for k, v in options.items()] or ["  (no options)"]
        return "\n".join(lines)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Sampler":
        """Build from keyword options (values may be text, converted by each option's type)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            has = f"its options are {', '.join(sorted(known))}" if known else "it has no options"
            raise UnknownOption(f"sampler {cls.name!r} has no option {unknown[0]!r}; {has}")
        return cls(**options)

    def __call__(self, denoiser: Any, schedule: Schedule, **kwargs: Any) -> Any:
        """``maskdiff.sample(denoiser, schedule, sampler=self, **kwargs)``."""
        # Looked up on use: the driver module imports this one.
        return importlib.import_module("maskdiff.sampling.sampler").sample(denoiser, schedule, sampler=self, **kwargs)


def _type_text(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "|".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(sampler: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` as an option of type ``hint``: text is converted, numbers are checked; ValueError
    ``sampler 'S': option name=value must be ...`` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none" and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(sampler, name, value, arg)
            except ValueError as err:
                errors.append(err)
        raise errors[0] if errors else ValueError(f"sampler {sampler!r}: option {name}={value!r} must be None")
    bad = ValueError(f"sampler {sampler!r}: option {name}={value!r} must be {_type_text(hint)}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and not isinstance(choice, str) and value == str(choice)):
                return choice
        raise ValueError(f"sampler {sampler!r}: option {name}={value!r} must be one of {', '.join(map(str, args))}")
    if hint is bool:
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str and not isinstance(value, str):
        raise bad
    return value
