"""Atomic writes: a failed write leaves the previous file and no temporary behind."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from maskdiff.fileio import atomic_path, atomic_write, write_json_atomic


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": ')  # half-written
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_writes_replace_and_are_readable(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.bin"  # the parent is created
    with atomic_write(target) as f:
        f.write(b"one")
    with atomic_write(target) as f:
        f.write(b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    write_json_atomic(tmp_path / "k.json", {"b": 2, "a": 1}, sort_keys=True)
    assert (tmp_path / "k.json").read_text() == '{\n  "a": 1,\n  "b": 2\n}\n'
