"""Image utilities: histogram baselines in bits/dim, sample grids, unmasking strips, an FID hook.

Images are token sequences ``(N, H*W*C)`` in raster order (row, column, channel), as produced
by :mod:`maskdiff.data.images`; the id ``vocab_size`` marks a masked sub-pixel. Pillow is
imported only by the drawing functions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from maskdiff.data.baselines import ArrayLike, as_token_array
from maskdiff.fileio import atomic_path

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "tokens_to_rgb",
    "image_grid",
    "save_grid",
    "unmasking_strip",
    "class_grid",
    "frechet_distance",
    "fid",
    "FIDUnavailableError",
    "MASK_COLOR",
]

#: Colour of a masked sub-pixel (a saturated red-magenta, far from grey levels and rare in
#: natural images). For colour images each channel is drawn on its own: a pixel with only
#: some channels masked shows the mask colour in those channels.
MASK_COLOR = (230, 20, 90)


# ----------------------------------------------------------------------------------------------
# Drawing


def tokens_to_rgb(
    tokens: ArrayLike,
    shape: tuple[int, int, int],
    vocab_size: int = 256,
    *,
    mask_color: Sequence[int] = MASK_COLOR,
) -> np.ndarray:
    """Token sequences to RGB pictures ``(N, H, W, 3)`` uint8, masks drawn in ``mask_color``.

    Ids ``0..V-1`` map to intensities ``round(v * 255 / (V - 1))``; id ``V`` is a masked
    sub-pixel. Grey images (C = 1) are repeated over R, G, B and a masked pixel gets the full
    mask colour; for C = 3 a masked channel ``k`` takes ``mask_color[k]``.
    """
    h, w, c = (int(s) for s in shape)
    if c not in (1, 3):
        raise ValueError(f"only 1 or 3 channels can be drawn, got shape {shape}")
    x = as_token_array(tokens, "tokens")
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != h * w * c:
        raise ValueError(f"tokens must be (N, {h * w * c}) for shape {shape}, got {x.shape}")
    if x.size and (x.min() < 0 or x.max() > vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}] ({vocab_size} = mask), got {x.min()}..{x.max()}")
    x = x.reshape(-1, h, w, c).astype(np.int64)
    masked = x == vocab_size
    val = np.where(masked, 0, x)
    grey = (val * 255 * 2 + (vocab_size - 1)) // (2 * (vocab_size - 1))  # round half up
    if c == 1:
        rgb = np.repeat(grey, 3, axis=-1)
        masked = np.repeat(masked, 3, axis=-1)
    else:
        rgb = grey
    color = np.broadcast_to(np.asarray(mask_color, dtype=np.int64), rgb.shape)
    return np.where(masked, color, rgb).astype(np.uint8)


def _grid_array(
    pictures: np.ndarray, nrow: int, scale: int, padding: int, pad_value: Sequence[int]
) -> np.ndarray:
    """Tile ``(N, h, w, 3)`` pictures ``nrow`` per row into one ``uint8`` array."""
    n, h, w, _ = pictures.shape
    if scale > 1:
        pictures = pictures.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    ncol = max(1, nrow)
    rows = max(1, math.ceil(n / ncol))
    H = rows * h + (rows + 1) * padding
    W = ncol * w + (ncol + 1) * padding
    out = np.empty((H, W, 3), dtype=np.uint8)
    out[:] = np.asarray(pad_value, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        out[y : y + h, x : x + w] = pictures[i]
    return out


def image_grid(
    tokens: ArrayLike,
    shape: tuple[int, int, int],
    nrow: int | None = None,
    *,
    vocab_size: int = 256,
    scale: int = 1,
    padding: int = 1,
    pad_value: Sequence[int] = (255, 255, 255),
    mask_color: Sequence[int] = MASK_COLOR,
) -> PILImage.Image:
    """A grid of images as one RGB ``PIL.Image``.

    Args:
        tokens: ``(N, H*W*C)`` ids in ``[0, V]`` (``V`` = masked), numpy or torch.
        shape: ``(H, W, C)``.
        nrow: images per row (default ``ceil(sqrt(N))``).
        vocab_size: ``V``; ids are scaled to 0..255 and ``V`` is drawn in ``mask_color``.
        scale: integer nearest-neighbour magnification (e.g. 4 for 28×28 digits).
        padding: pixels between images (not scaled), filled with ``pad_value``.
    """
    from PIL import Image

    pics = tokens_to_rgb(tokens, shape, vocab_size, mask_color=mask_color)
    n = pics.shape[0]
    if nrow is None:
        nrow = max(1, math.ceil(math.sqrt(n)))
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    return Image.fromarray(_grid_array(pics, nrow, scale, padding, pad_value))


def _save(img: PILImage.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``img`` atomically (temporary file, then rename); the format from the suffix (.png
    recommended: lossless; PNG when the suffix names none)."""
    from PIL import Image

    p = Path(path)
    fmt = Image.registered_extensions().get(p.suffix.lower(), "PNG")
    with atomic_path(p) as tmp:
        img.save(tmp, format=fmt)
    return p


def save_grid(
    tokens: ArrayLike,
    shape: tuple[int, int, int],
    path: str | os.PathLike[str],
    nrow: int | None = None,
    **kwargs: Any,
) -> Path:
    """:func:`image_grid` written to ``path`` (PNG by suffix); returns the path."""
    return _save(image_grid(tokens, shape, nrow, **kwargs), path)


def unmasking_strip(
    trajectory: ArrayLike,
    shape: tuple[int, int, int],
    path: str | os.PathLike[str] | None = None,
    *,
    final: ArrayLike | None = None,
    vocab_size: int = 256,
    scale: int = 2,
    **kwargs: Any,
) -> PILImage.Image:
    """The unmasking of samples over time: one row per sample, one frame per recorded step.

    ``trajectory`` is what :func:`maskdiff.sampling.sample` records with
    ``return_info=True, record_every=k``: ``info.trajectory`` of shape ``(K, B, L)`` (each
    sample becomes a row) or one sample's ``(K, L)`` (one row). ``final`` (``(B, L)`` or
    ``(L,)``), e.g. the returned samples, is appended as the last frame (useful because any
    masks left after the last step are filled by the final argmax). Written to ``path`` when
    given. Masks are drawn in the mask colour (see :func:`tokens_to_rgb`).
    """
    t = as_token_array(trajectory, "trajectory")
    if t.ndim == 2:
        t = t[:, None, :]
    if t.ndim != 3:
        raise ValueError(f"trajectory must be (K, L) or (K, B, L), got {t.shape}")
    if final is not None:
        f = as_token_array(final, "final").reshape(1, -1, t.shape[2])
        if f.shape[1] != t.shape[1]:
            raise ValueError(f"final has {f.shape[1]} samples, trajectory {t.shape[1]}")
        t = np.concatenate([t, f], axis=0)
    k, b, L = t.shape
    frames = t.transpose(1, 0, 2).reshape(b * k, L)  # row = sample, column = time
    img = image_grid(frames, shape, nrow=k, vocab_size=vocab_size, scale=scale, **kwargs)
    if path is not None:
        _save(img, path)
    return img


def class_grid(
    tokens: ArrayLike,
    labels: ArrayLike,
    shape: tuple[int, int, int],
    per_class: int = 8,
    *,
    num_classes: int | None = None,
    path: str | os.PathLike[str] | None = None,
    vocab_size: int = 256,
    **kwargs: Any,
) -> PILImage.Image:
    """One row per class: the first ``per_class`` images of class 0, then class 1, ...

    Classes with fewer images leave blank (padding-coloured) cells. ``num_classes`` defaults
    to ``max(labels) + 1``. Written to ``path`` when given.
    """
    x = as_token_array(tokens, "tokens")
    y = as_token_array(labels, "labels").reshape(-1)
    if x.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"tokens (N, L) and labels (N,) must match, got {x.shape} and {y.shape}")
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    pad = tuple(kwargs.get("pad_value", (255, 255, 255)))
    pics = tokens_to_rgb(x, shape, vocab_size, mask_color=kwargs.get("mask_color", MASK_COLOR))
    h, w = pics.shape[1:3]
    cells = np.empty((num_classes * per_class, h, w, 3), dtype=np.uint8)
    cells[:] = np.asarray(pad, dtype=np.uint8)
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)[:per_class]
        cells[c * per_class : c * per_class + idx.size] = pics[idx]
    from PIL import Image

    arr = _grid_array(cells, per_class, kwargs.get("scale", 1), kwargs.get("padding", 1), pad)
    img = Image.fromarray(arr)
    if path is not None:
        _save(img, path)
    return img


# ----------------------------------------------------------------------------------------------
# FID


class FIDUnavailableError(RuntimeError):
    """FID needs an Inception-v3 feature network that is not available offline."""


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``, with the
    last trace computed as the sum of square roots of the eigenvalues of the symmetric matrix
    ``sigma1^{1/2} sigma2 sigma1^{1/2}`` (same eigenvalues as ``sigma1 sigma2``; float64,
    negative round-off eigenvalues clipped to 0). NumPy only.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ ((s2 + s2.T) / 2) @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fid(
    samples: ArrayLike,
    reference: ArrayLike,
    shape: tuple[int, int, int],
    *,
    feature_extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
) -> float:
    """Fréchet Inception Distance between ``samples`` and ``reference`` (``(N, H*W*C)`` tokens).

    The standard FID uses the TF-ported Inception-v3 pool features. The maintained PyTorch
    libraries, ``torch-fidelity`` and ``pytorch-fid``, both need ``torchvision`` (this project
    pins its own torch and must not install it) and download those weights from GitHub at first
    use (``weights-inception-2015-12-05-6726825d.pth`` / ``pt_inception-2015-12-05-6726825d.pth``),
    which cannot work offline here. So without ``feature_extractor`` this raises
    :class:`FIDUnavailableError`.

    With ``feature_extractor`` (a callable mapping a uint8 tensor ``(B, C, H, W)`` with values
    0..255 to features ``(B, D)``, e.g. torch-fidelity's ``FeatureExtractorInceptionV3`` on a
    machine that has the weights), the Fréchet distance of the feature Gaussians is returned.
    Only images without masks are accepted (8-bit, V = 256).
    """
    if feature_extractor is None:
        raise FIDUnavailableError(
            "FID needs Inception-v3 features: install torch-fidelity (or pytorch-fid) together "
            "with torchvision on a machine with internet access, let it download the FID weights "
            "(weights-inception-2015-12-05-6726825d.pth, about 90 MB) and pass its feature network as "
            "fid(..., feature_extractor=...). Neither the weights nor torchvision are available "
            "in this offline environment."
        )
    stats = []
    for what, x in (("samples", samples), ("reference", reference)):
        arr = as_token_array(x, what)
        h, w, c = shape
        if arr.ndim != 2 or arr.shape[1] != h * w * c:
            raise ValueError(f"{what} must be (N, {h * w * c}), got {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{what} must hold 8-bit values 0..255 without masks")
        if arr.shape[0] < 2:
            raise ValueError(f"{what} needs at least 2 images for a covariance")
        feats = []
        for a in range(0, arr.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(arr[a : a + batch_size], dtype=np.uint8))
            batch = batch.reshape(-1, h, w, c).permute(0, 3, 1, 2)
            with torch.no_grad():
                feats.append(torch.as_tensor(feature_extractor(batch)).double().cpu().numpy())
        f = np.concatenate(feats).reshape(arr.shape[0], -1)
        stats.append((f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))))
    return frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
