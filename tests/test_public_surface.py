"""The public surface only grows: names, entry-point signatures and every CLI flag with its default.

The snapshot in ``tests/data/public-surface.json`` was taken from maskdiff 0.1.0
(``tests/public_surface.py``). New parameters are allowed only as keyword-only with a default;
new subcommands and flags are allowed; nothing in the snapshot may vanish or change.
"""

import json
import subprocess
import sys

import pytest

from public_surface import ENTRY_POINTS, SNAPSHOT, snapshot

OLD = json.loads(SNAPSHOT.read_text())


@pytest.fixture(scope="module")
def now():
    return snapshot()


def signature_grows(old, new):
    """Problems if ``new`` does not keep ``old``'s parameters (order, kind, default)."""
    problems = []
    names = [p["name"] for p in new]
    for i, p in enumerate(old):
        if i >= len(new) or new[i] != p:
            problems.append(f"parameter {p} changed or moved (now {new[i] if i < len(new) else 'missing'})")
    for p in new[len(old):]:
        if p["kind"] not in ("KEYWORD_ONLY", "VAR_KEYWORD") or (p["default"] == "<required>" and p["kind"] != "VAR_KEYWORD"):
            problems.append(f"new parameter {p['name']} must be keyword-only with a default")
    assert len(set(names)) == len(names)
    return problems


def test_all_unchanged_or_grown(now):
    assert set(OLD["all"]) <= set(now["all"])


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_signature_only_grows(now, name):
    assert signature_grows(OLD["signatures"][name], now["signatures"][name]) == []


def flag_kept(old, new):
    """A flag keeps its spec; its choices may only grow (the old ones first, in their order)."""
    if new is None or {k: v for k, v in new.items() if k != "choices"} != {k: v for k, v in old.items() if k != "choices"}:
        return False
    if old["choices"] is None or new["choices"] is None:
        return old["choices"] == new["choices"]
    return new["choices"][: len(old["choices"])] == old["choices"]


def test_cli_flags_and_defaults_kept(now):
    missing = []
    for cmd, options in OLD["cli"].items():
        if cmd not in now["cli"]:
            missing.append(f"subcommand {cmd}")
            continue
        for flag, spec in options.items():
            if not flag_kept(spec, now["cli"][cmd].get(flag)):
                missing.append(f"{cmd} {flag}: {spec} -> {now['cli'][cmd].get(flag)}")
    assert missing == []


def test_flag_check_has_power():
    old = {"dest": "sampler", "default": "ancestral", "choices": ["ancestral", "mean"], "nargs": None}
    assert flag_kept(old, old) and flag_kept(old, {**old, "choices": ["ancestral", "mean", "first-hitting"]})
    assert not flag_kept(old, {**old, "choices": ["ancestral"]})
    assert not flag_kept(old, {**old, "choices": ["mean", "ancestral"]})
    assert not flag_kept(old, {**old, "default": "mean"})
    assert not flag_kept(old, {**old, "choices": None})
    assert not flag_kept(old, None)


def test_signature_check_has_power():
    old = [{"name": "x", "kind": "POSITIONAL_OR_KEYWORD", "default": "<required>"}]
    assert signature_grows(old, old + [{"name": "m", "kind": "KEYWORD_ONLY", "default": None}]) == []
    assert signature_grows(old, old + [{"name": "m", "kind": "POSITIONAL_OR_KEYWORD", "default": None}])
    assert signature_grows(old, [{"name": "x", "kind": "POSITIONAL_OR_KEYWORD", "default": 1}])


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "maskdiff.cli", "presets"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout
