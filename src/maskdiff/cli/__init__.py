"""Command-line interface: ``maskdiff <subcommand>``; ``maskdiff --help`` lists them.

Each module of this package adds a group of subcommands: it has ``add_parsers(sub)`` and a
``HANDLERS`` dict (subcommand name -> handler ``(args) -> exit code``); :data:`COMMAND_MODULES`
lists them in help order. A new subcommand is one module and one line there. Handlers are thin:
they call a library function (:mod:`maskdiff.training`, :mod:`maskdiff.apps`) and print. Nothing
in the package imports the CLI (``tests/test_layering.py`` keeps it so).
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType
from typing import Callable, Sequence

from maskdiff.cli import commands, lmeval, serve
from maskdiff.cli.commands import (  # noqa: F401  (names kept importable from maskdiff.cli)
    _parse_paths,
    cmd_compare,
    cmd_demo,
    cmd_eval,
    cmd_genppl,
    cmd_plot,
    cmd_presets,
    cmd_sample,
    cmd_train,
    cmd_zeroshot,
)

__all__ = ["main", "build_parser", "HANDLERS", "COMMAND_MODULES"]

#: the modules that add subcommands, in the order ``maskdiff --help`` lists them.
COMMAND_MODULES: list[ModuleType] = [commands, serve, lmeval]

HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    name: handler for module in COMMAND_MODULES for name, handler in module.HANDLERS.items()
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (flag, value, where to look) with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maskdiff", description="Masked discrete diffusion (MD4 / GenMD4).")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


_USER_ERRORS = (ValueError, LookupError, ImportError, RuntimeError, PermissionError, FileNotFoundError,
                FileExistsError, IsADirectoryError, NotADirectoryError)


def _exit_code(err: BaseException) -> int:
    """2 for bad input (nothing was done), 1 for a failure of the work itself; an ``exit_code``
    attribute of the exception decides when it has one."""
    code = getattr(err, "exit_code", None)
    if isinstance(code, int):
        return code
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return 1
    return 2 if isinstance(err, _USER_ERRORS) else 1  # other OSErrors (disk full, I/O) and bugs: 1


def _message(err: BaseException) -> str:
    """The error as one line, naming the file of an OSError; an unexpected exception (a bug) says so."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, ImportError) and err.name and "install" not in text:
        return f"{text}: install it (pip install {err.name.split('.')[0]})"
    if isinstance(err, OSError) and err.filename and err.strerror:
        fix = {13: "choose a location you may write to", 28: "free some space; files written before are complete",
               30: "choose a location you may write to"}.get(err.errno or 0, "")
        return f"{err.filename}: {err.strerror}" + (f"; {fix}" if fix else "")
    if not isinstance(err, (*_USER_ERRORS, OSError)) and not hasattr(err, "exit_code"):
        return (f"internal error, {type(err).__name__}: {text} (a bug in maskdiff: please report it; "
                "MASKDIFF_DEBUG=1 shows the traceback)")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Every error is one line on stderr: exit code 2 for bad input (nothing was
    done), 1 when the work itself failed; a traceback only with ``MASKDIFF_DEBUG=1``."""
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except KeyboardInterrupt:
        if os.environ.get("MASKDIFF_DEBUG"):
            raise
        print("error: interrupted (Ctrl-C); files already written are complete", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("MASKDIFF_DEBUG"):
            raise
        print(f"error: {_message(err)}", file=sys.stderr)
        return _exit_code(err)

