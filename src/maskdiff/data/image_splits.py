"""The image counterpart of :mod:`~maskdiff.data.splits` and :mod:`~maskdiff.data.batches`.

An image of height H, width W and C channels becomes a sequence of ``L = H*W*C`` tokens in
**raster order (row, column, channel)**: token ``(r*W + c)*C + k`` is channel ``k`` of the
pixel in row ``r``, column ``c``. With 8-bit images the vocabulary is ``V = 256`` (the mask id
is 256) and a likelihood in nats per image divided by ``L ln 2`` is in **bits per dimension**.

Unlike text corpora (:class:`maskdiff.data.TokenSplits`, 1-D token streams cropped at random
offsets), images are fixed-size examples: :class:`ImageSplits` holds one ``uint8`` array of
shape ``(N, L)`` per split (possibly a read-only ``np.memmap``) and optional ``int64`` labels.

Here: the container :class:`ImageSplits` (with the data interface it shares with
``TokenSplits``: ``image_shape``, ``num_classes``, ``shard_for``, ``draw``, ``meta``,
``check_eval_splits``), the
layout and split rules (:func:`to_raster`, :func:`stratified_split`, :func:`hold_out_last`)
and batching (:func:`random_images`, :func:`eval_image_batches`, :func:`shard_images`). The
loaders are in :mod:`~maskdiff.data.mnist`, :mod:`~maskdiff.data.cifar10` and
:mod:`~maskdiff.data.imagenet64`; the registry :func:`~maskdiff.data.images.load_images` is in
:mod:`~maskdiff.data.images`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from maskdiff.data.baselines import histogram_bits_per_dim
from maskdiff.data.errors import DataError
from maskdiff.data.splits import SPLIT_NAMES as _SPLITS
from maskdiff.data.splits import describe_source

__all__ = [
    "ImageSplits",
    "to_raster",
    "stratified_split",
    "hold_out_last",
    "random_images",
    "eval_image_batches",
    "num_eval_batches",
    "shard_images",
]

#: A training shard of images: ``(images (n, L) uint8, labels (n,) int64 or None)``, views.
ImageShard = tuple[np.ndarray, np.ndarray | None]


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

    # The data interface shared with TokenSplits (the trainer calls only these).

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(H, W, C)`` of every image (``TokenSplits.image_shape`` is None)."""
        return self.shape

    def meta(self) -> dict[str, Any]:
        """What a run's ``meta.json`` records beyond :meth:`sizes`: ``{"image_shape": [H, W, C], "num_classes": n}``."""
        return {"image_shape": list(self.shape), "num_classes": self.num_classes}

    def check_eval_splits(self, seq_len: int, splits: Sequence[str] = ("validation", "test")) -> None:
        """Check, before any work, that ``seq_len`` is H·W·C and each of ``splits`` holds an image.

        The image counterpart of ``TokenSplits.check_eval_splits`` (same call, same error type).

        Raises:
            DataError: one line naming the data set and its source, the split (or ``data.seq_len``)
                and the fix.
        """
        where = describe_source(self.name, self.metadata)
        if seq_len != self.seq_len:
            raise DataError(
                f"{where}: images have {self.seq_len} values (H·W·C = {self.shape}), not data.seq_len={seq_len}: "
                f"set data.seq_len={self.seq_len}"
            )
        for s in splits:
            if len(self.split(s)) == 0:
                held_out = s == "validation" and "val_size" in self.metadata
                fix = "set data.val_size to at least 1" if held_out else "check data.path: its files hold none"
                raise DataError(f"{where}: the {s} split holds 0 images, nothing to evaluate: {fix}")

    def num_eval_sequences(self, split: str, seq_len: int) -> int:
        """How many sequences an evaluation of ``split`` scores: its images."""
        return len(self.split(split))

    def baseline_bits(self, split: str, n_sequences: int | None = None) -> dict[str, float]:
        """The context-free baselines of the first ``n_sequences`` images of ``split`` (default
        all), fitted on train (:func:`~maskdiff.data.baselines.histogram_bits_per_dim`):
        ``{"unigram_bits_per_token": one shared histogram, "histogram_bits_per_dim": one per sub-pixel}``."""
        hist = histogram_bits_per_dim(self.train, self.split(split)[:n_sequences], self.vocab_size)
        return {"unigram_bits_per_token": hist["global"], "histogram_bits_per_dim": hist["per_dim"]}

    def shard_for(self, stream: int, n_streams: int, seq_len: int) -> ImageShard:
        """The training shard of stream ``stream`` of ``n_streams``, for :meth:`draw`.

        It is :func:`shard_images` of the training images and labels: ``(images (n, L) uint8,
        labels (n,) int64 or None)``, views, contiguous; the shards of all streams in order are
        exactly the training split and their sizes differ by at most one. ``seq_len`` is not
        used (every image is :attr:`seq_len` tokens); it is there for ``TokenSplits``.

        Raises:
            ValueError: the shard holds no images (more streams than training images).
        """
        images, labels = shard_images(self.train, self.train_labels, stream, n_streams)
        if len(images) == 0:
            raise ValueError(f"training shard {stream} holds no images: use fewer processes × accumulation steps")
        return images, labels

    def draw(
        self, shard: ImageShard, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A training batch from a :meth:`shard_for` shard: :func:`random_images` of it.

        ``batch_size`` images drawn uniformly with replacement, the indices from one
        ``torch.randint`` on ``generator`` (so a restored generator continues the stream).
        ``seq_len`` is not used (see :meth:`shard_for`).

        Returns:
            ``(x, labels)``: ``x`` int64 ``(batch_size, H*W*C)``, ``labels`` int64
            ``(batch_size,)`` or None when the set has no labels; on the CPU.
        """
        images, labels = shard
        return random_images(images, labels, batch_size, generator)


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


def hold_out_last(
    x: np.ndarray, y: np.ndarray, val_size: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out the last ``val_size`` rows of ``(x, y)``: ``(x_train, x_val, y_train, y_val)`` (views).

    Raises:
        DataError: ``val_size`` is not an int in ``[0, N)``; the message names ``data.val_size``.
    """
    n = int(x.shape[0])
    if not isinstance(val_size, (int, np.integer)) or isinstance(val_size, bool) or val_size < 0:
        raise DataError(f"data.val_size must be a whole number of images >= 0 for {what}, got {val_size!r}")
    if val_size >= n:
        fix = f"set data.val_size to a number in 1..{n - 1}" if n > 1 else "use a larger training set"
        raise DataError(
            f"{what} has {n} training images, too few to hold out the last {val_size} for validation: {fix} "
            "(how many of the last training images to hold out for validation)"
        )
    a = n - int(val_size)
    return x[:a], x[a:], y[:a], y[a:]


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
