"""Bad data inputs (issue 13): each gives one line naming the file or ``data.*`` key, the problem and
the fix, as a ``ValueError`` / ``FileNotFoundError`` / ``RuntimeError`` (what the CLI prints as
``error: ...`` with exit code 2), found at load time, before any training or evaluation.

Hostile files are built with the standard library only and are never unpickled by a naive loader.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

import maskdiff.data as md
from maskdiff.data.cifar10 import load_cifar10
from maskdiff.data.errors import DataError, MissingColumnError, MissingDependencyError, UnsafePickleError
from maskdiff.data.imagenet64 import load_imagenet64
from maskdiff.data.sources import load_data
from maskdiff.data.wiki import load_wiki_char, read_wiki_extracts

CLI_ERRORS = (ValueError, FileNotFoundError, RuntimeError)  # what maskdiff.cli turns into `error: ...`
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def one_line_error(excinfo, *names: str) -> str:
    """The error's message, checked to be one line, a CLI-handled type, and to name ``names``."""
    err = excinfo.value
    msg = str(err)
    assert isinstance(err, CLI_ERRORS), type(err)
    assert "\n" not in msg and msg.strip() == msg and msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


# ----------------------------------------------------------------------------------------------
# Fixtures built with the standard library (and NumPy for the pixel arrays)


def make_cifar(folder: Path, per_batch: int = 4) -> Path:
    """A python-version CIFAR-10 folder (5 training batches + test batch), ``per_batch`` images each."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in BATCHES:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({b"data": x, b"labels": y}, protocol=2))
    return folder


class _RunsACommand:
    """Pickles to ``os.system(command)``: what a naive ``pickle.load`` would execute."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def hostile_pickle(marker: Path) -> bytes:
    """A pickle that would create ``marker`` if a naive loader unpickled it (we never do)."""
    return pickle.dumps({b"data": _RunsACommand(f"touch {marker}"), b"labels": [0]}, protocol=2)


def write_text8(path: Path, n_chars: int) -> Path:
    words = ("masked", "diffusion", "tokens", "text", "eight")
    text = " ".join(words[i % len(words)] for i in range(n_chars))[:n_chars]
    path.write_text(text, encoding="ascii")
    return path


# ----------------------------------------------------------------------------------------------
# hf: without `datasets`


def test_hf_without_datasets_names_the_extra(tmp_path, monkeypatch):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "hello"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(MissingDependencyError) as ei:
        md.load_corpus("hf", path=src, cache_dir=tmp_path / "cache", progress=False)
    msg = one_line_error(ei, "pip install 'maskdiff[hf]'", "datasets")
    assert isinstance(ei.value, ImportError) and "Traceback" not in msg
    with pytest.raises(MissingDependencyError):  # a Hub corpus too
        md.load_corpus("openwebtext", cache_dir=tmp_path / "cache", progress=False)


# ----------------------------------------------------------------------------------------------
# CIFAR-10: hostile pickle, truncated batches, a subset without a fitting val_size


def test_cifar10_hostile_pickle_is_refused_naming_the_file(tmp_path):
    folder = make_cifar(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(hostile_pickle(marker))
    with pytest.raises(UnsafePickleError) as ei:
        load_cifar10(folder, val_size=2)
    one_line_error(ei, str(folder / "data_batch_3"), "posix.system" if os.name == "posix" else "system",
                   "cifar-10-python.tar.gz")
    assert isinstance(ei.value, pickle.UnpicklingError) and isinstance(ei.value, ValueError)
    assert not marker.exists()


def test_cifar10_hostile_pickle_inside_the_tarball(tmp_path):
    folder = make_cifar(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(hostile_pickle(marker))
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    with pytest.raises(UnsafePickleError) as ei:
        load_cifar10(tgz, val_size=2)
    one_line_error(ei, f"{tgz}:test_batch")
    assert not marker.exists()


@pytest.mark.parametrize("cut", ["half", "empty", "garbage"])
def test_cifar10_truncated_batch_names_the_file(tmp_path, cut):
    folder = make_cifar(tmp_path / "cifar-10-batches-py")
    f = folder / "data_batch_2"
    blob = f.read_bytes()
    f.write_bytes({"half": blob[: len(blob) // 2], "empty": b"", "garbage": b"not a pickle at all"}[cut])
    with pytest.raises(DataError) as ei:
        load_cifar10(folder, val_size=2)
    one_line_error(ei, str(f), "truncated or not a pickle", "cifar-10-python.tar.gz")


def test_cifar10_truncated_tarball_names_the_file(tmp_path):
    folder = make_cifar(tmp_path / "src" / "cifar-10-batches-py", per_batch=50)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    blob = tgz.read_bytes()
    tgz.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(DataError) as ei:
        load_cifar10(tgz, val_size=2)
    one_line_error(ei, str(tgz), "fetch")


def test_cifar10_batch_with_wrong_contents(tmp_path):
    folder = make_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_4").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError) as ei:
        load_cifar10(folder, val_size=2)
    one_line_error(ei, str(folder / "data_batch_4"), "(N, 3072)")


def test_cifar10_subset_needs_val_size(tmp_path):
    folder = make_cifar(tmp_path / "cifar-10-batches-py")  # 20 training images
    with pytest.raises(DataError) as ei:
        load_data("cifar10", seq_len=3072, path=folder)  # the standard 5,000 do not fit
    one_line_error(ei, str(folder), "20 training images", "5000", "data.val_size", "1..19")
    d = load_data("cifar10", seq_len=3072, path=folder, val_size=3)  # what data.val_size=3 passes
    assert d.sizes() == {"train": 17, "validation": 3, "test": 4}
    with pytest.raises(DataError) as ei:  # val_size=0: no validation images to evaluate
        load_data("cifar10", seq_len=3072, path=folder, val_size=0)
    one_line_error(ei, "cifar10", "validation split holds 0 images", "data.val_size")
    with pytest.raises(DataError) as ei:
        load_data("cifar10", seq_len=3072, path=folder, val_size=-1)
    one_line_error(ei, "data.val_size", "-1")


def test_settings_that_do_not_apply_are_refused(tmp_path):
    with pytest.raises(DataError) as ei:
        load_data("digits", seq_len=64, val_size=10)
    one_line_error(ei, "data.val_size", "digits")
    with pytest.raises(DataError) as ei:
        load_data("mnist", seq_len=784, path=tmp_path)
    one_line_error(ei, "data.path", "mnist", "remove data.path")
    with pytest.raises(DataError) as ei:
        load_data("digits", seq_len=100)
    one_line_error(ei, "data.seq_len=64", "H·W·C")


def test_image_path_problems(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        load_data("cifar10", seq_len=3072, path=tmp_path / "nowhere")
    one_line_error(ei, str(tmp_path / "nowhere"), "cifar-10-python.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as ei:
        load_data("imagenet64", seq_len=12288, path=tmp_path / "empty")
    one_line_error(ei, "train_data_batch_1.npz")


def test_imagenet64_truncated_npz_names_the_file(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("train_data_batch_1.npz", "val_data.npz"):
        np.savez(tmp_path / name, data=rng.integers(0, 256, (3, 12288), dtype=np.uint8), labels=np.arange(1, 4))
    bad = tmp_path / "train_data_batch_1.npz"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError) as ei:
        load_imagenet64(tmp_path, val_size=1, cache_dir=tmp_path / "cache")
    one_line_error(ei, str(bad), "truncated or not an npz batch")
    assert not any((tmp_path / "cache" / "images").glob("imagenet64-*"))  # no half-built cache entry


# ----------------------------------------------------------------------------------------------
# Wiki JSON


GOOD_WIKI = {f"t{i}": {"title": f"t{i}", "extract": "hello world " * 40} for i in range(30)}


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"{not json", "is not valid JSON"),
        (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
        (b"[1, 2, 3]", "got a JSON list"),
        (b"{}", "holds no articles"),
        (json.dumps({"a": {"extract": 3}}).encode(), "no string 'extract' field"),
        (b"", "is empty"),
    ],
)
def test_garbage_wiki_json_names_the_file(tmp_path, content, says):
    f = tmp_path / "summaries.json"
    f.write_bytes(content)
    with pytest.raises(DataError) as ei:
        md.load_corpus("wiki-char", path=f, cache_dir=tmp_path / "cache")
    one_line_error(ei, str(f), says)
    with pytest.raises(DataError):
        read_wiki_extracts(f)


def test_wiki_path_missing_or_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        md.load_corpus("wiki-gpt2", path=tmp_path / "missing.json", cache_dir=tmp_path)
    one_line_error(ei, "data.path", "missing.json", "does not exist")
    with pytest.raises(DataError) as ei:
        md.load_corpus("wiki-char", path=tmp_path, cache_dir=tmp_path)
    one_line_error(ei, "data.path", str(tmp_path), "is a folder")


def test_cache_dir_that_is_a_file(tmp_path):
    f = tmp_path / "summaries.json"
    f.write_text(json.dumps(GOOD_WIKI))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DataError) as ei:
        load_data("wiki-char", seq_len=16, path=f, cache_dir=blocker / "cache")
    one_line_error(ei, str(blocker), "data.cache_dir")


# ----------------------------------------------------------------------------------------------
# A split shorter than one chunk: found at load time


def test_short_validation_split_found_at_load_time(tmp_path):
    f = write_text8(tmp_path / "text8", 2_000)  # validation 100, test 100 characters
    d = load_data("text8", seq_len=64, path=f)  # fits
    assert d.sizes() == {"train": 1800, "validation": 100, "test": 100}
    with pytest.raises(DataError) as ei:
        load_data("text8", seq_len=128, path=f)
    one_line_error(ei, "text8", str(f), "validation split holds 100 tokens", "data.seq_len=128", "at most 100")
    loaded = load_data("text8", seq_len=128, path=f, check_splits=False)  # callers may defer the check
    with pytest.raises(DataError, match="test split holds 100 tokens"):
        loaded.check_eval_splits(128, ["test"])


def test_token_splits_check_eval_splits():
    tok = md.CharTokenizer()
    s = md.TokenSplits("tiny", 27, tok, np.zeros(500, np.uint8), np.zeros(40, np.uint8), np.zeros(30, np.uint8),
                       {"source": "/data/tiny.txt"})
    s.check_eval_splits(30)  # validation 40, test 30: one chunk each
    with pytest.raises(DataError) as ei:
        s.check_eval_splits(32)
    one_line_error(ei, "tiny (/data/tiny.txt)", "test split holds 30 tokens", "data.seq_len=32", "at most 30")
    s.check_eval_splits(32, ["validation"])  # only the splits asked for
    with pytest.raises(DataError, match="train split holds 500 tokens"):
        s.check_eval_splits(501, md.SPLIT_NAMES)


def test_image_splits_check_eval_splits():
    x = np.zeros((4, 64), np.uint8)
    d = md.ImageSplits("digits", (8, 8, 1), 17, 0, x, x[:0], x[:2], metadata={"source": "here", "val_size": 0})
    d.check_eval_splits(64, ["test"])
    with pytest.raises(DataError) as ei:
        d.check_eval_splits(64)
    one_line_error(ei, "digits (here)", "validation split holds 0 images", "data.val_size")
    with pytest.raises(DataError) as ei:
        d.check_eval_splits(63, ["test"])
    one_line_error(ei, "data.seq_len=63", "set data.seq_len=64")


def test_short_hf_corpus_found_at_load_time(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} says hello"}) + "\n" for i in range(20)))
    with pytest.raises(DataError) as ei:
        load_data("hf", seq_len=256, path=src, cache_dir=tmp_path / "cache")
    one_line_error(ei, str(src), "split holds", "data.seq_len=256")


# ----------------------------------------------------------------------------------------------
# Hugging Face local files


def test_hf_bad_local_files_name_the_file(tmp_path):
    cache = tmp_path / "cache"
    kw = {"cache_dir": cache, "progress": False}
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"body": "hello"}\n')
    with pytest.raises(MissingColumnError) as ei:
        md.load_corpus("hf", path=nocol, **kw)
    one_line_error(ei, str(nocol), "no column 'text'", "['body']")
    assert isinstance(ei.value, KeyError)

    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("garbage{{{\n")
    with pytest.raises(DataError) as ei:
        md.load_corpus("hf", path=garbage, **kw)
    one_line_error(ei, str(garbage), "reading the documents failed")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as ei:
        md.load_corpus("hf", path=empty, **kw)
    one_line_error(ei, str(empty), "is empty")

    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(RuntimeError) as ei:
        md.load_corpus("hf", path=parquet, **kw)
    one_line_error(ei, str(parquet))

    with pytest.raises(DataError) as ei:
        md.load_corpus("hf", **kw)
    one_line_error(ei, "data.path")
    assert not any(cache.glob("packed/*.bin"))  # nothing half-written


def test_text8_damaged_zip(tmp_path):
    z = tmp_path / "text8.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", "abc def " * 5000)
    blob = bytearray(z.read_bytes())
    blob[60:80] = b"\x00" * 20  # corrupt the compressed data, keep the directory
    z.write_bytes(bytes(blob))
    with pytest.raises(DataError) as ei:
        md.load_corpus("text8", path=z)
    one_line_error(ei, str(z), "damaged zip", "text8.zip")


def test_good_small_wiki_file_still_loads(tmp_path):
    f = tmp_path / "summaries.json"
    f.write_text(json.dumps(GOOD_WIKI))
    d = load_wiki_char(path=f, cache_dir=tmp_path / "cache")
    assert d.sizes() == {"train": 12960, "validation": 720, "test": 720}  # 14,400 characters, 90/5/5
    d.check_eval_splits(32)


# ----------------------------------------------------------------------------------------------
# Through the real CLI: exit code 2 and one line on stderr


TINY = ["train.steps=2", "train.batch_size=2", "train.eval_every=1", "train.eval_batches=1", "train.save_every=2",
        "model.n_layers=1", "model.d_model=16", "model.n_heads=2", "train.device=cpu"]


def run_cli_train(tmp_path: Path, sets: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "maskdiff.cli", "train", "--preset", "demo", "--out", str(tmp_path / "run"),
           "--no-progress"]
    for s in TINY + sets:
        cmd += ["--set", s]
    env = {**os.environ, "MASKDIFF_CACHE": str(tmp_path / "cache"), **(env_extra or {})}
    env.pop("MASKDIFF_DEBUG", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_cli_hostile_cifar_pickle(tmp_path):
    folder = make_cifar(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(hostile_pickle(marker))
    proc = run_cli_train(tmp_path, ["data.corpus=cifar10", f"data.path={folder}", "data.seq_len=3072"])
    assert_one_error_line(proc, str(folder / "data_batch_1"), "refusing to unpickle")
    assert not marker.exists()


def test_cli_hf_without_datasets(tmp_path):
    stub = tmp_path / "stub" / "datasets"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named datasets (test stub)')\n")
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "hello"}\n')
    pythonpath = os.pathsep.join([str(stub.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = run_cli_train(tmp_path, ["data.corpus=hf", f"data.path={src}", "data.seq_len=16"],
                         env_extra={"PYTHONPATH": pythonpath})
    assert_one_error_line(proc, "pip install 'maskdiff[hf]'")


def test_cli_short_validation_split(tmp_path):
    f = write_text8(tmp_path / "text8", 2_000)
    proc = run_cli_train(tmp_path, ["data.corpus=text8", f"data.path={f}", "data.seq_len=128"])
    assert_one_error_line(proc, "validation split holds 100 tokens", "data.seq_len=128", str(f))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
