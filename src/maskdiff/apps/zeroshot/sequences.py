"""Evaluation sequences: rows detokenised, GPT-2-tokenised and laid out in blocks, with score masks.

Block conventions (``convention=``):

``"concat"`` (SEDD's and MDLM's ``wrap``): every row is detokenised and tokenised, followed by
    end-of-text (EOT, id 50256), and the rows are joined in order into one stream that is cut
    into consecutive blocks of ``seq_len`` tokens. Every token of a block is scored, EOTs included.
    The trailing partial block is dropped (``drop_last=True``, as SEDD and MDLM do); with
    ``drop_last=False`` it is padded with EOT and only its real tokens are scored. (MDLM's
    ``wrap`` additionally frames each block as ``[EOT] + seq_len-2 tokens + [EOT]``; that variant
    is not implemented.)
``"pad"`` (MDLM's unwrapped evaluation): every row is one sequence on its own,
    ``[EOT] + tokens + [EOT]`` followed by EOT padding up to ``seq_len``. A row longer than
    ``seq_len - 2`` tokens is truncated to ``[EOT] + its first seq_len-1 tokens`` (no closing EOT:
    the row did not end there; MDLM's tokenizer puts its EOS after the cut) and counted in
    ``n_truncated``; the rest of the row is not evaluated.
    **Scored tokens**: the row's tokens and its closing EOT. The leading EOT (present by
    construction) is not scored unless ``score_bos=True``; the padding is never scored. The whole
    padded sequence is the model's input and goes through the masking process (as in MDLM), and
    the diffusion, reconstruction and prior terms are summed over the scored positions only
    (the ``score_mask`` of :mod:`maskdiff.losses`).
    That sum is the NELBO of the model in which the unscored positions are known (a point mass
    on their value): a valid upper bound on ``-log p(row | its length)``. MDLM scores its BOS
    and EOS and excludes its ``[PAD]`` token (an extra id) through the attention mask; here the
    padding is EOT, which the model knows, and the BOS is left out by default.

Empty rows (WikiText's blank lines) are kept, as SEDD and MDLM keep them (each is then just an
EOT in the stream, or a one-token sequence); ``skip_empty=True`` drops them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from maskdiff.data.tokenizers import GPT2_EOT_ID, GPT2Tokenizer

__all__ = ["CONVENTIONS", "ZeroShotSequences", "concat_blocks", "pad_sequences", "build_sequences"]

CONVENTIONS = ("concat", "pad")


@dataclass
class ZeroShotSequences:
    """Evaluation sequences of one data set under one block convention.

    Attributes:
        tokens: int32 array (N, seq_len) of GPT-2 ids.
        score_mask: bool array (N, seq_len): the positions whose likelihood is counted.
        convention: ``"concat"`` or ``"pad"``.
        n_documents: rows used. n_truncated: rows cut at ``seq_len`` (``pad``).
        n_unscored_tail: tokens of the joined stream left out by ``drop_last`` (``concat``).
    """

    tokens: np.ndarray
    score_mask: np.ndarray
    convention: str
    n_documents: int
    n_truncated: int = 0
    n_unscored_tail: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_scored(self) -> int:
        return int(self.score_mask.sum())


def _check_seq_len(seq_len: int, minimum: int) -> None:
    if seq_len < minimum:
        raise ValueError(f"seq_len must be at least {minimum}, got {seq_len}")


def concat_blocks(
    documents: Iterable[Sequence[int]],
    seq_len: int,
    *,
    eot: int = GPT2_EOT_ID,
    drop_last: bool = True,
    max_blocks: int | None = None,
) -> ZeroShotSequences:
    """``concat``: each document followed by ``eot``, joined, cut into blocks of ``seq_len``.

    Every token of a full block is scored. The trailing partial block is dropped
    (``drop_last=True``) or padded with ``eot`` with only its real tokens scored. Documents are
    consumed lazily and reading stops once ``max_blocks`` blocks are filled.
    """
    _check_seq_len(seq_len, 1)
    stream: list[int] = []
    n_docs = 0
    need = None if max_blocks is None else max_blocks * seq_len
    for doc in documents:
        stream.extend(int(t) for t in doc)
        stream.append(eot)
        n_docs += 1
        if need is not None and len(stream) >= need:
            break
    n_full = len(stream) // seq_len
    if max_blocks is not None and n_full >= max_blocks:  # stopped reading early: no tail
        n_full, partial, unscored = max_blocks, False, 0
    else:
        tail = len(stream) - n_full * seq_len
        partial = tail > 0 and not drop_last
        unscored = 0 if partial else tail
    n_blocks = n_full + int(partial)
    if n_blocks == 0:
        raise ValueError(
            f"the documents hold {len(stream)} tokens (with end-of-text separators), fewer than one block of "
            f"seq_len={seq_len}; use convention='pad' or drop_last=False"
        )
    n_tokens = min(len(stream), n_blocks * seq_len)
    tokens = np.full((n_blocks, seq_len), eot, dtype=np.int32)
    mask = np.zeros((n_blocks, seq_len), dtype=bool)
    tokens.reshape(-1)[:n_tokens] = np.asarray(stream[:n_tokens], dtype=np.int32)
    mask.reshape(-1)[:n_tokens] = True
    return ZeroShotSequences(tokens, mask, "concat", n_docs, n_unscored_tail=unscored)


def pad_sequences(
    documents: Iterable[Sequence[int]],
    seq_len: int,
    *,
    eot: int = GPT2_EOT_ID,
    score_bos: bool = False,
    max_sequences: int | None = None,
) -> ZeroShotSequences:
    """``pad``: ``[eot] + doc + [eot]`` padded with ``eot`` to ``seq_len``, one row per document.

    Scored: the document's tokens and the closing ``eot`` (and the leading one with
    ``score_bos``); never the padding. A document longer than ``seq_len - 2`` tokens becomes
    ``[eot] + doc[:seq_len-1]`` (no closing ``eot``) and is counted as truncated.
    """
    _check_seq_len(seq_len, 2)
    rows_t: list[np.ndarray] = []
    rows_m: list[np.ndarray] = []
    n_trunc = 0
    for doc in documents:
        if max_sequences is not None and len(rows_t) >= max_sequences:
            break
        ids = np.asarray(doc, dtype=np.int32)
        t = np.full(seq_len, eot, dtype=np.int32)
        m = np.zeros(seq_len, dtype=bool)
        if ids.size <= seq_len - 2:
            t[1 : 1 + ids.size] = ids
            m[1 : ids.size + 2] = True  # the document and its closing end-of-text
        else:
            t[1:] = ids[: seq_len - 1]
            m[1:] = True
            n_trunc += 1
        m[0] = score_bos
        rows_t.append(t)
        rows_m.append(m)
    if not rows_t:
        raise ValueError("no documents to evaluate")
    return ZeroShotSequences(np.stack(rows_t), np.stack(rows_m), "pad", len(rows_t), n_truncated=n_trunc)


def _tokenized(rows: Sequence[str], detokenize: Callable[[str], str] | None, chunk: int = 512) -> Iterator[list[int]]:

    tok = GPT2Tokenizer()
    for start in range(0, len(rows), chunk):
        texts = rows[start : start + chunk]
        if detokenize is not None:
            texts = [detokenize(t) for t in texts]
        yield from tok.encode_batch(texts, num_threads=2)


def build_sequences(
    rows: Sequence[str],
    *,
    seq_len: int,
    convention: str = "concat",
    detokenize: Callable[[str], str] | None = None,
    drop_last: bool = True,
    score_bos: bool = False,
    skip_empty: bool = False,
    max_sequences: int | None = None,
) -> ZeroShotSequences:
    """Detokenise and GPT-2-tokenise ``rows``, then lay them out by ``convention``.

    ``skip_empty`` drops rows that are empty or whitespace only (they are kept by default, as in
    the literature). ``max_sequences`` keeps the first N sequences (and tokenises only what they
    need).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be positive, got {max_sequences}")
    if skip_empty:
        rows = [r for r in rows if r.strip()]
    docs = _tokenized(rows, detokenize)
    if convention == "concat":
        return concat_blocks(docs, seq_len, drop_last=drop_last, max_blocks=max_sequences)
    return pad_sequences(docs, seq_len, score_bos=score_bos, max_sequences=max_sequences)
