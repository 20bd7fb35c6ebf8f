"""CIFAR-10 (32×32×3, 256 levels, 10 classes) from local files.

Sources: the standard python version (``cifar-10-python.tar.gz``, its folder
``cifar-10-batches-py`` or the tarball itself) or the Hugging Face ``uoft-cs/cifar10`` Parquet
files (columns ``img`` = PNG bytes, ``label``). The validation split is the **last 5,000 images
of the training set** (the end of ``data_batch_5``); ``val_size=0`` trains on all 50,000.

The python batches are pickles, read with a restricted unpickler (:class:`_RestrictedUnpickler`)
that only builds a NumPy array. Parquet files are decoded with Pillow once and cached as ``.npy``
(:func:`~maskdiff.data._cache.cached_image_arrays`). The files cannot be downloaded here (no
network); missing files raise ``FileNotFoundError`` naming the download and the expected layout.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from maskdiff.data._cache import cached_image_arrays, default_cache_dir
from maskdiff.data.errors import DataError, UnsafePickleError, one_line
from maskdiff.data.image_splits import ImageSplits, hold_out_last, to_raster

__all__ = ["load_cifar10", "CIFAR10_URL", "CIFAR10_HF", "CIFAR10_CLASSES"]

PathLike = str | os.PathLike[str]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_HF = "uoft-cs/cifar10"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 batches: only a NumPy uint8 array, lists, ints and bytes.

    The python version of CIFAR-10 is only distributed as pickles (written by Python 2), so
    reading it means unpickling. Arbitrary pickles can run code; this unpickler refuses every
    global except the few NumPy reconstructors an ``ndarray`` needs (and ``_codecs.encode``,
    which Python 3 protocol-2 pickles use for bytes), so a tampered file fails with
    :class:`~maskdiff.data.errors.UnsafePickleError` (an ``UnpicklingError`` and a ``ValueError``)
    instead of executing anything.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise UnsafePickleError(f"refusing to unpickle global {module}.{name}")
        return super().find_class(*target)


_REFETCH = f"replace it with the file from a fresh copy of {CIFAR10_URL}"


def _read_cifar_batch(f: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(data (N, 3072) uint8, labels (N,) int64)`` of one python-version batch; ``what`` names it.

    Raises:
        UnsafePickleError: the pickle asks for anything but a NumPy array (nothing is executed).
        DataError: truncated, not a pickle, or not a CIFAR-10 batch.
    """
    try:
        d = _RestrictedUnpickler(f, encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"CIFAR-10 batch {what} is not a CIFAR-10 pickle ({e}; it may run code, so it was not "
            f"loaded): {_REFETCH}"
        ) from None
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(
            f"CIFAR-10 batch {what} is truncated or not a pickle ({type(e).__name__}: {one_line(e)}): {_REFETCH}"
        ) from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DataError(f"CIFAR-10 batch {what} is not a dict with b'data' and b'labels': {_REFETCH}")
    data = np.asarray(d[b"data"])
    try:
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"CIFAR-10 batch {what}: b'labels' is not a list of ints ({one_line(e)}): {_REFETCH}") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"CIFAR-10 batch {what}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072): {_REFETCH}"
        )
    if labels.shape != (data.shape[0],) or (labels.size and not 0 <= labels.min() <= labels.max() < 10):
        raise DataError(f"CIFAR-10 batch {what}: labels do not match the data or lie outside 0..9: {_REFETCH}")
    return data, labels


def _read_python_batches(kind: str, src: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every batch of the python version, from the folder (``kind="pickle"``) or the tarball."""
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if kind == "pickle":
        for b in _CIFAR_BATCHES:
            try:
                with open(src / b, "rb") as f:
                    parts[b] = _read_cifar_batch(f, str(src / b))
            except (PermissionError, IsADirectoryError) as e:
                raise DataError(f"CIFAR-10 batch {src / b} cannot be read ({e.strerror})") from e
        return parts
    try:
        with tarfile.open(src) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [b for b in _CIFAR_BATCHES if b not in members]
            if missing:
                raise FileNotFoundError(_cifar_layout_help(f"{src} lacks {missing}"))
            for b in _CIFAR_BATCHES:
                f = tar.extractfile(members[b])
                assert f is not None
                parts[b] = _read_cifar_batch(f, f"{src}:{b}")
    except (tarfile.TarError, EOFError, zlib.error, PermissionError) as e:
        raise DataError(
            f"{src} is not a readable tar archive ({type(e).__name__}: {one_line(e)}); the download may be "
            f"truncated: fetch {CIFAR10_URL} again"
        ) from e
    return parts


_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _cifar_layout_help(looked: str) -> str:
    return (
        f"CIFAR-10 not found ({looked}). It cannot be downloaded here (no network access). "
        f"Download {CIFAR10_URL} (163 MB, the 'CIFAR-10 python version') elsewhere and pass "
        "path= to the .tar.gz, to its extracted folder 'cifar-10-batches-py' (data_batch_1 .. "
        "data_batch_5, test_batch) or to a folder containing either; or pass a folder with the "
        f"Hugging Face '{CIFAR10_HF}' Parquet files (train*.parquet and test*.parquet in any "
        "sub-folder, e.g. plain_text/train-00000-of-00001.parquet, columns 'img' and 'label'). "
        "Without path=, $MASKDIFF_CACHE/cifar10 (default ~/.cache/maskdiff/cifar10) is searched."
    )


def _find_cifar(path: PathLike | None, cache_dir: PathLike | None) -> tuple[str, Path]:
    roots = [Path(path).expanduser()] if path is not None else [default_cache_dir(cache_dir) / "cifar10"]
    for p in roots:
        if p.is_file():
            if p.name.endswith((".tar.gz", ".tgz", ".tar")):
                return "tar", p
            if p.suffix == ".parquet":
                return "parquet", p
        if not p.is_dir():
            continue
        for d in (p, p / "cifar-10-batches-py"):
            if all((d / b).is_file() for b in _CIFAR_BATCHES):
                return "pickle", d
        for name in ("cifar-10-python.tar.gz", "cifar-10-python.tgz"):
            if (p / name).is_file():
                return "tar", p / name
        if any(p.rglob("*.parquet")):
            return "parquet", p
    raise FileNotFoundError(_cifar_layout_help("looked in " + ", ".join(str(r) for r in roots)))


def load_cifar10(
    path: PathLike | None = None,
    *,
    val_size: int = 5000,
    cache_dir: PathLike | None = None,
) -> ImageSplits:
    """CIFAR-10 (32×32×3, 256 levels, 10 classes) from local files, in raster order.

    Sources (``path``): the python-version tarball ``cifar-10-python.tar.gz`` (read in place),
    its extracted ``cifar-10-batches-py`` folder (or a folder containing it), or a folder with
    the Hugging Face ``uoft-cs/cifar10`` Parquet files. The batches are pickles written by
    Python 2 (``{b"data": uint8 (10000, 3072) as R, G, B planes of 32×32, b"labels": [...]}``);
    they are read with a restricted unpickler that only allows a NumPy array (see
    :class:`_RestrictedUnpickler`). Parquet images (PNG bytes) are decoded with Pillow once and
    the result is cached as ``.npy`` under the cache directory.

    Splits: train = ``data_batch_1..5`` (Parquet: the ``train`` files) minus its last
    ``val_size`` images, validation = those last ``val_size`` images, test = ``test_batch``.
    """
    t0 = time.perf_counter()
    kind, src = _find_cifar(path, cache_dir)
    if kind == "parquet":
        arrays, meta = cached_image_arrays(
            "cifar10-parquet", _parquet_files(src), cache_dir, lambda d: _build_cifar_parquet(src, d)
        )
        tr_x, tr_y, te_x, te_y = arrays["train"], arrays["train_labels"], arrays["test"], arrays["test_labels"]
        meta = {"cache": meta.get("cache_dir")}
    else:
        parts = _read_python_batches(kind, src)
        tr_x = to_raster(np.concatenate([parts[b][0] for b in _CIFAR_BATCHES[:5]]), (32, 32, 3))
        tr_y = np.concatenate([parts[b][1] for b in _CIFAR_BATCHES[:5]])
        te_x = to_raster(parts["test_batch"][0], (32, 32, 3))
        te_y = parts["test_batch"][1]
        meta = {}
    train, val, train_l, val_l = hold_out_last(tr_x, tr_y, val_size, f"CIFAR-10 at {src}")
    meta.update(
        source=str(src),
        format=kind,
        split=f"validation = last {val_size} training images; test = test batch",
        val_size=val_size,
        seconds=time.perf_counter() - t0,
    )
    return ImageSplits(
        name="cifar10",
        shape=(32, 32, 3),
        vocab_size=256,
        num_classes=10,
        train=train,
        validation=val,
        test=te_x,
        train_labels=train_l,
        validation_labels=val_l,
        test_labels=te_y,
        class_names=CIFAR10_CLASSES,
        metadata=meta,
    )


def _parquet_files(src: Path) -> dict[str, list[Path]]:
    files = [src] if src.is_file() else sorted(src.rglob("*.parquet"))
    out: dict[str, list[Path]] = {"train": [], "test": []}
    for f in files:
        rel = f.name if src.is_file() else str(f.relative_to(src))
        words = set(re.split(r"[^a-z]+", rel.lower()))
        if "test" in words:
            out["test"].append(f)
        elif "train" in words:
            out["train"].append(f)
    if not out["train"] or not out["test"]:
        raise FileNotFoundError(
            _cifar_layout_help(
                f"Parquet files under {src} must include 'train' and 'test' files, found "
                f"{[str(f) for f in files]}"
            )
        )
    return out


def _decode_png_column(table: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    cols = table.column_names
    img_col = next((c for c in ("img", "image") if c in cols), None)
    lab_col = next((c for c in ("label", "labels") if c in cols), None)
    if img_col is None or lab_col is None:
        raise DataError(f"{what}: expected columns 'img' (or 'image') and 'label', found {cols}")
    imgs = table.column(img_col).to_pylist()
    labels = np.asarray(table.column(lab_col).to_pylist(), dtype=np.int64)
    out = np.empty((len(imgs), 3072), dtype=np.uint8)
    for i, cell in enumerate(imgs):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None:
            raise DataError(f"{what}: row {i} has no image bytes (only a path?)")
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for undecodable images
            raise DataError(f"{what}: row {i} is not a readable image ({type(e).__name__}: {one_line(e)})") from e
        if arr.shape != (32, 32, 3):
            raise DataError(f"{what}: row {i} is {arr.shape}, expected a 32x32 RGB image")
        out[i] = arr.reshape(-1)  # PIL gives (row, column, channel): already raster order
    return out, labels


def _build_cifar_parquet(src: Path, out_dir: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _parquet_files(src)
    for split in ("train", "test"):
        tables = []
        for f in files[split]:
            try:
                tables.append(pq.read_table(f))
            except (pa.ArrowException, OSError) as e:
                raise DataError(
                    f"{f} is not a readable Parquet file ({type(e).__name__}: {one_line(e)}): replace it with "
                    f"the file from the Hugging Face dataset {CIFAR10_HF}"
                ) from e
        what = f"{CIFAR10_HF} {split} ({', '.join(str(f) for f in files[split])})"
        x, y = _decode_png_column(pa.concat_tables(tables), what)
        if y.size and not 0 <= y.min() <= y.max() < 10:
            raise DataError(f"{what}: labels outside 0..9")
        np.save(out_dir / f"{split}.npy", x, allow_pickle=False)
        np.save(out_dir / f"{split}_labels.npy", y, allow_pickle=False)
    return {"files": {k: [str(f) for f in v] for k, v in files.items()}}
