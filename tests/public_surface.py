"""Snapshot of the public surface: ``maskdiff.__all__``, the entry points' signatures, the CLI tree.

``python tests/public_surface.py write`` stores it in ``tests/data/public-surface.json`` (written
once from maskdiff 0.1.0); ``tests/test_public_surface.py`` checks that the surface only grows.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).resolve().parent / "data" / "public-surface.json"
ENTRY_POINTS = ("get_schedule", "md4_nelbo", "md4_loss_terms", "genmd4_losses", "sample", "load")


def _default(value: object) -> object:
    if value is inspect.Parameter.empty:
        return "<required>"
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def signature_of(fn: object) -> list[dict]:
    return [{"name": p.name, "kind": p.kind.name, "default": _default(p.default)}
            for p in inspect.signature(fn).parameters.values()]


def cli_tree() -> dict:
    from maskdiff.cli import build_parser  # tests may import the CLI; the package may not

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    tree = {}
    for name, p in sorted(sub.choices.items()):
        options = {}
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            key = "/".join(action.option_strings) or action.dest
            options[key] = {"dest": action.dest, "default": _default(action.default),
                            "choices": list(action.choices) if action.choices else None,
                            "nargs": action.nargs if isinstance(action.nargs, (int, str, type(None))) else repr(action.nargs)}
        tree[name] = options
    return tree


def snapshot() -> dict:
    import maskdiff

    return {"all": sorted(maskdiff.__all__),
            "signatures": {name: signature_of(getattr(maskdiff, name)) for name in ENTRY_POINTS},
            "cli": cli_tree()}


if __name__ == "__main__":
    if sys.argv[1:] == ["write"]:
        SNAPSHOT.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
    print(json.dumps(snapshot(), indent=1, sort_keys=True))
