"""Conditioning: which positions are fixed (prompts, suffixes, infilling templates).

``fixed`` (LongTensor (B or 1, L)) holds a token id at every fixed position and ``FREE`` (-1) or
the mask id at free positions. The sampler starts fixed positions unmasked and never changes
them. :func:`make_fixed` builds one from a prefix, a suffix and arbitrary positions;
:func:`fixed_from_template` from a text template with gaps ("the ___ sat on the ___").
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["FREE", "make_fixed", "fixed_from_template"]

#: Marker for a free (to be generated) position in a ``fixed`` tensor.
FREE = -1


def _as_token_rows(tokens: Sequence[int] | Tensor, name: str) -> Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"{name} must be a sequence of token ids (P,) or a batch (B, P), got shape {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} token ids must be ≥ 0")
    return t


def make_fixed(
    length: int,
    *,
    prefix: Sequence[int] | Tensor | None = None,
    suffix: Sequence[int] | Tensor | None = None,
    positions: Mapping[int, int] | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Build a ``fixed`` tensor (B or 1, L): token ids where fixed, ``FREE`` (-1) elsewhere.

    Args:
        length: L.
        prefix: prompt tokens placed at positions 0..P-1; (P,) shared or (B, P) per sequence.
        suffix: tokens placed at the end, L-S..L-1; (S,) or (B, S).
        positions: {position: token} for arbitrary fixed positions (negative positions count
            from the end), shared by the batch.
        batch_size: broadcast the result to (B, L); otherwise its batch dimension is 1 unless a
            (B, P) prefix/suffix sets it.
    """
    if length < 1:
        raise ValueError(f"length must be ≥ 1, got {length}")
    rows = [1]
    pre = _as_token_rows(prefix, "prefix") if prefix is not None else None
    suf = _as_token_rows(suffix, "suffix") if suffix is not None else None
    for t in (pre, suf):
        if t is not None:
            rows.append(t.shape[0])
    if batch_size is not None:
        rows.append(batch_size)
    b = max(rows)
    if any(r not in (1, b) for r in rows):
        raise ValueError(f"prefix, suffix and batch_size disagree on the batch size: {rows[1:]}")
    fixed = torch.full((b, length), FREE, dtype=torch.long)
    taken = torch.zeros(length, dtype=torch.bool)
    if pre is not None and pre.shape[1]:
        p = pre.shape[1]
        if p > length:
            raise ValueError(f"prefix has {p} tokens but the sequence length is {length}")
        fixed[:, :p] = pre
        taken[:p] = True
    if suf is not None and suf.shape[1]:
        s = suf.shape[1]
        if s > length:
            raise ValueError(f"suffix has {s} tokens but the sequence length is {length}")
        if bool(taken[length - s :].any()):
            raise ValueError(f"prefix and suffix overlap: together they need more than {length} positions")
        fixed[:, length - s :] = suf
        taken[length - s :] = True
    for pos, tok in (positions or {}).items():
        i = pos + length if pos < 0 else pos
        if not 0 <= i < length:
            raise ValueError(f"fixed position {pos} is outside a sequence of length {length}")
        if tok < 0:
            raise ValueError(f"fixed token at position {pos} must be ≥ 0, got {tok}")
        if bool(taken[i]):
            raise ValueError(f"position {pos} is fixed twice (prefix/suffix/positions overlap)")
        fixed[:, i] = int(tok)
        taken[i] = True
    return fixed


def fixed_from_template(
    template: str,
    tokenizer: Any,
    *,
    gap: str = "___",
    gap_length: int | Sequence[int] = 8,
    length: int | None = None,
) -> Tensor:
    """Infilling template → ``fixed`` (1, L), e.g. ``"the ___ sat on the ___"``.

    The text between gaps is encoded piece by piece with ``tokenizer.encode(str) -> list[int]``
    (so sub-word tokenizers see each piece on its own; keep spaces next to the words they
    belong to); every ``gap`` becomes ``gap_length`` free positions (an int for all gaps, or
    one per gap). With ``length`` larger than the template, the remaining positions at the end
    are free; smaller is an error.
    """
    if not gap:
        raise ValueError("gap marker must be a non-empty string")
    if not hasattr(tokenizer, "encode"):
        raise TypeError("tokenizer must have an encode(str) -> list[int] method")
    pieces = template.split(gap)
    n_gaps = len(pieces) - 1
    if isinstance(gap_length, int):
        lengths = [gap_length] * n_gaps
    else:
        lengths = [int(g) for g in gap_length]
        if len(lengths) != n_gaps:
            raise ValueError(f"template has {n_gaps} gaps but {len(lengths)} gap lengths were given")
    if any(g < 0 for g in lengths):
        raise ValueError(f"gap lengths must be ≥ 0, got {lengths}")
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if piece:
            enc = [int(i) for i in tokenizer.encode(piece)]
            if any(i < 0 for i in enc):
                raise ValueError("tokenizer returned negative token ids")
            ids.extend(enc)
        if k < n_gaps:
            ids.extend([FREE] * lengths[k])
    total = len(ids)
    if length is not None:
        if length < total:
            raise ValueError(f"template needs {total} tokens but length={length}; shorten the gaps or the text")
        ids.extend([FREE] * (length - total))
    if not ids:
        raise ValueError("template produced an empty sequence")
    return torch.tensor(ids, dtype=torch.long)[None]


def _prepare_fixed(fixed: Tensor | None, batch: int, length: int, vocab_size: int, device: torch.device) -> Tensor | None:
    """Validate ``fixed`` and return it as (B, L) with ``FREE`` at free positions (or None)."""
    if fixed is None:
        return None
    f = torch.as_tensor(fixed).to(device=device)
    if f.dtype.is_floating_point or f.dtype == torch.bool:
        raise ValueError(f"fixed must be an integer tensor of token ids, got {f.dtype}")
    f = f.long()
    if f.dim() == 1:
        f = f[None]
    if f.dim() != 2 or f.shape[1] != length or f.shape[0] not in (1, batch):
        raise ValueError(f"fixed must have shape (B or 1, L) = ({batch} or 1, {length}), got {tuple(f.shape)}")
    bad = (f < FREE) | (f > vocab_size)
    if bool(bad.any()):
        raise ValueError(
            f"fixed holds values outside [-1, {vocab_size}]: use token ids in [0, {vocab_size}) for fixed "
            f"positions and {FREE} (or the mask id {vocab_size}) for free ones"
        )
    f = torch.where(f == vocab_size, torch.full_like(f, FREE), f)
    return f.expand(batch, length)
