"""Text to windows: the run's tokenizer as the harness needs it, and how requests become windows.

* :class:`TextCodec` encodes the harness's strings with the run's own tokenizer. GPT-2 runs read
  any text; the harness's pair convention applies (trailing spaces of the context move to the
  continuation, the pair is encoded whole and split where the context's tokens end, an empty
  context is the end-of-text token). Character runs (wiki-char, text8: ``a-z`` and space) cannot
  read other characters: with ``normalize="text8"`` (default) every text goes through the corpus's
  own rule (:func:`maskdiff.data.normalize_text8`: lowercase, digits spelled out, anything else a
  space, runs of spaces one space), the pair normalised as a whole and split after the context's
  normalised form; ``normalize="none"`` refuses such text. :attr:`TextCodec.normalised` counts
  the texts the rule changed (reported with the results).
* :func:`pair_windows`: a ``loglikelihood`` request is one window of the last ``seq_len`` tokens
  (context truncated on the left, as the harness expects) when the continuation fits; a longer
  continuation is scored in consecutive windows, each with the tokens before it as context.
* :func:`rolling_windows`: ``loglikelihood_rolling`` scores every token of a document exactly once,
  in consecutive windows of ``seq_len`` tokens (after the prefix, if any) — the chunks ``maskdiff
  eval`` scores — and a last window of full length whose earlier tokens are context (the harness's
  convention of ``lm_eval.utils.get_rolling_token_windows``, for a model without a BOS position).
"""

from __future__ import annotations

from typing import Any, Sequence

from maskdiff.apps.lmeval.estimators import Window
from maskdiff.data import normalize_text8
from maskdiff.data.tokenizers import GPT2_EOT_ID

__all__ = ["NORMALIZE", "TextCodec", "pair_windows", "rolling_windows"]

NORMALIZE = ("text8", "none")


class TextCodec:
    """The run's tokenizer for harness requests (see the module docs).

    Args:
        tokenizer: ``run.tokenizer`` (``encode``/``decode``).
        characters: the run reads characters (``data.corpus`` in ``CHAR_CORPORA``).
        normalize: ``"text8"`` or ``"none"`` (character runs only; GPT-2 runs read any text).
    """

    def __init__(self, tokenizer: Any, *, characters: bool, normalize: str = "text8") -> None:
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize={normalize!r}: choose one of {', '.join(NORMALIZE)}")
        self.tokenizer, self.characters, self.normalize = tokenizer, characters, normalize
        #: texts (contexts, continuations, documents) the normalisation changed
        self.normalised = 0
        #: the token before a document or an empty context: end-of-text for GPT-2 runs, none for characters
        self.prefix: tuple[int, ...] = () if characters else (GPT2_EOT_ID,)

    def _clean(self, text: str) -> str:
        """``text`` as a character run reads it (unchanged for GPT-2 runs)."""
        if not self.characters:
            return text
        clean = normalize_text8(text)
        if clean != text and self.normalize == "none":
            odd = sorted({c for c in text if not ("a" <= c <= "z" or c == " ")})
            what = f"characters outside a-z and space ({', '.join(map(repr, odd[:8]))})" if odd else "runs of spaces"
            raise ValueError(f"the text {text[:60]!r} has {what}, which this character model cannot read; "
                             "pass normalize=text8 in the model arguments (maskdiff lm-eval --normalize text8)")
        return clean

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (normalised for character runs)."""
        clean = self._clean(text)
        self.normalised += clean != text
        return list(self.tokenizer.encode(clean))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of a ``loglikelihood`` request (see the module docs)."""
        if self.characters:
            ctx = self._clean(context)
            whole = self._clean(context + continuation)
            # Normalisation maps characters one by one and merges runs of spaces, so the whole text
            # starts with the normalised context (a space run across the boundary stays in the context).
            cont = whole[len(ctx):] if whole.startswith(ctx) else self._clean(continuation)
            self.normalised += (ctx != context) or (cont != continuation)
            return list(self.tokenizer.encode(ctx)), list(self.tokenizer.encode(cont))
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = list(self.tokenizer.encode(context + continuation))
        ctx = list(self.tokenizer.encode(context))
        if not context:
            return list(self.prefix), whole
        return ctx, whole[len(ctx):]


def pair_windows(context: Sequence[int], continuation: Sequence[int], length: int) -> list[Window]:
    """The windows of a ``loglikelihood`` request (each at most ``length`` tokens; see the module docs)."""
    tokens = tuple(context) + tuple(continuation)
    start, n = len(context), len(tokens)
    if n - start <= length:
        first = max(0, n - length)  # left truncation of the context
        return [Window(tokens[first:], start - first)]
    windows = []
    for a in range(start, n, length):
        b = min(a + length, n)
        first = max(0, b - length)
        windows.append(Window(tokens[first:b], a - first))
    return windows


def rolling_windows(tokens: Sequence[int], length: int, prefix: Sequence[int] = ()) -> list[Window]:
    """The windows of a ``loglikelihood_rolling`` document: ``prefix + tokens`` cut at multiples of
    ``length``, every token of ``tokens`` scored once; the last window is full-length, its earlier
    tokens context (see the module docs)."""
    stream = tuple(prefix) + tuple(tokens)
    windows, a = [], len(prefix)
    while a < len(stream):
        b = min((a // length + 1) * length, len(stream))
        first = max(0, b - length)
        windows.append(Window(stream[first:b], a - first))
        a = b
    return windows
