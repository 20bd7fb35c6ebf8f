"""Downsampled ImageNet 64×64 (Chrabaszcz et al. 2017) from local ``.npz`` batches.

Files: ``train_data_batch_1.npz`` … ``train_data_batch_10.npz`` and ``val_data.npz``; keys
``data`` ``(N, 12288)`` channel-major and ``labels`` 1..1000, stored here as 0..999. Validation
is the **last 10,000 images of the training set** (end of batch 10); the official 50,000
validation images are the test split. The first load converts to raster order into a ``.npy``
cache (15.7 GB for the full training set, :func:`~maskdiff.data._cache.cached_image_arrays`)
that later loads memory-map. The files cannot be downloaded here (no network); missing files
raise ``FileNotFoundError`` naming the download and the expected layout.
"""

from __future__ import annotations

import os
import re
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from maskdiff.data._cache import cached_image_arrays, default_cache_dir
from maskdiff.data.errors import DataError, one_line
from maskdiff.data.image_splits import ImageSplits, hold_out_last, to_raster

__all__ = ["load_imagenet64", "IMAGENET64_URL"]

PathLike = str | os.PathLike[str]

IMAGENET64_URL = "https://image-net.org/download-images.php"
_REFETCH = f"replace it with the file from a fresh download ({IMAGENET64_URL})"


def _imagenet_help(looked: str) -> str:
    return (
        f"ImageNet 64x64 not found ({looked}). It cannot be downloaded here (no network "
        f"access). Download the 'Downsampled ImageNet 64x64' npz files from {IMAGENET64_URL} "
        "(Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip, Imagenet64_val_npz.zip; "
        "an ImageNet account is needed), unzip them into one folder and pass it as path=: it must "
        "hold train_data_batch_1.npz .. train_data_batch_10.npz and val_data.npz (any sub-folders), "
        "each with keys 'data' (N, 12288) uint8 and 'labels' (1..1000). Without path=, "
        "$MASKDIFF_CACHE/imagenet64 (default ~/.cache/maskdiff/imagenet64) is searched."
    )


def _find_imagenet64(path: PathLike | None, cache_dir: PathLike | None) -> dict[str, list[Path]]:
    root = Path(path).expanduser() if path is not None else default_cache_dir(cache_dir) / "imagenet64"
    if not root.is_dir():
        raise FileNotFoundError(_imagenet_help(f"{root} is not a folder"))
    train = {}
    for f in root.rglob("train_data_batch_*.npz"):
        m = re.fullmatch(r"train_data_batch_(\d+)\.npz", f.name)
        if m:
            train[int(m.group(1))] = f
    val = sorted(root.rglob("val_data.npz"))
    if not train or not val:
        raise FileNotFoundError(
            _imagenet_help(f"{root} has {len(train)} train_data_batch_*.npz and {len(val)} val_data.npz")
        )
    if len(val) > 1:
        raise DataError(f"several val_data.npz under {root}: {[str(v) for v in val]}; keep one")
    return {"train": [train[k] for k in sorted(train)], "test": val}


def _read_npz(f: Path, key: str) -> np.ndarray:
    """Member ``key`` of the npz batch ``f``; a truncated or foreign file is one line naming it."""
    try:
        with np.load(f, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(f"{f} has no {key!r} array (it has {z.files}): {_REFETCH}")
            return np.asarray(z[key])
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{f} is truncated or not an npz batch ({type(e).__name__}: {one_line(e)}): {_REFETCH}") from e


def _build_imagenet64(files: dict[str, list[Path]], out_dir: Path, chunk: int = 8192) -> dict[str, Any]:
    info: dict[str, Any] = {"files": {k: [str(f) for f in v] for k, v in files.items()}}
    for split, fs in files.items():
        counts = []
        for f in fs:  # pass 1: sizes (reads only the small 'labels' member)
            counts.append(int(_read_npz(f, "labels").reshape(-1).shape[0]))
        n = sum(counts)
        x = np.lib.format.open_memmap(out_dir / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(n, 12288))
        y = np.empty(n, dtype=np.int64)
        pos = 0
        for f, cnt in zip(fs, counts, strict=True):
            data, lab = _read_npz(f, "data"), _read_npz(f, "labels").astype(np.int64).reshape(-1)
            if data.dtype != np.uint8 or data.shape != (cnt, 12288):
                raise DataError(f"{f}: 'data' is {data.dtype} {data.shape}, expected uint8 ({cnt}, 12288): {_REFETCH}")
            if cnt and not 1 <= lab.min() <= lab.max() <= 1000:
                raise DataError(f"{f}: labels outside 1..1000 (expected 1-based ImageNet classes): {_REFETCH}")
            for i in range(0, cnt, chunk):
                x[pos + i : pos + min(i + chunk, cnt)] = to_raster(data[i : i + chunk], (64, 64, 3))
            y[pos : pos + cnt] = lab - 1
            pos += cnt
            del data
        x.flush()
        del x
        np.save(out_dir / f"{split}_labels.npy", y, allow_pickle=False)
        info[f"{split}_images"] = n
    return info


def load_imagenet64(
    path: PathLike | None = None,
    *,
    val_size: int = 10000,
    cache_dir: PathLike | None = None,
) -> ImageSplits:
    """Downsampled ImageNet 64×64 (Chrabaszcz et al. 2017, npz batches), raster order.

    Splits: train = ``train_data_batch_1..10`` in batch order minus its last ``val_size``
    images, validation = those last ``val_size``, test = ``val_data.npz`` (50,000). Labels are
    stored 0-based (file label - 1). The first call converts every file to one ``.npy`` per
    split in ``$MASKDIFF_CACHE/images/`` (keyed by the files' paths, sizes and mtimes; about
    16 GB for the full set) and later calls memory-map it, so memory use stays small.
    """
    t0 = time.perf_counter()
    files = _find_imagenet64(path, cache_dir)
    arrays, meta = cached_image_arrays("imagenet64", files, cache_dir, lambda d: _build_imagenet64(files, d))
    train, val, train_l, val_l = hold_out_last(
        arrays["train"], arrays["train_labels"], val_size, f"ImageNet 64x64 at {Path(files['train'][0]).parent}"
    )
    return ImageSplits(
        name="imagenet64",
        shape=(64, 64, 3),
        vocab_size=256,
        num_classes=1000,
        train=train,
        validation=val,
        test=arrays["test"],
        train_labels=np.asarray(train_l),
        validation_labels=np.asarray(val_l),
        test_labels=np.asarray(arrays["test_labels"]),
        metadata={
            "source": str(Path(files["train"][0]).parent),
            "cache": meta.get("cache_dir"),
            "split": f"validation = last {val_size} training images; test = val_data.npz",
            "val_size": val_size,
            "validation_classes": int(np.unique(val_l).size),
            "seconds": time.perf_counter() - t0,
        },
    )
