"""Tokenizers: a 27-symbol character tokenizer (text8) and offline GPT-2 BPE.

Both tokenizers implement the :class:`Tokenizer` protocol (``name``, ``vocab_size``,
``encode``, ``decode``) so corpora and models can treat them alike.

* :class:`CharTokenizer` -- text8 alphabet: space = 0, ``a..z`` = 1..26 (vocab 27).
* :class:`GPT2Tokenizer` / :func:`gpt2_tokenizer` -- GPT-2 BPE (vocab 50257,
  ``<|endoftext|>`` = 50256) built from the ranks file that ships inside the
  ``openai-whisper`` distribution, so no network access is needed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import tiktoken
import tiktoken.load

from maskdiff.data._cache import sha256_file

__all__ = [
    "Tokenizer",
    "CharTokenizer",
    "GPT2Tokenizer",
    "gpt2_tokenizer",
    "normalize_text8",
    "GPT2_RANKS_SHA256",
    "GPT2_PAT_STR",
    "GPT2_EOT_ID",
    "GPT2_VOCAB_SIZE",
]

# --------------------------------------------------------------------------------------
# Common interface
# --------------------------------------------------------------------------------------


@runtime_checkable
class Tokenizer(Protocol):
    """What a corpus needs from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _as_int_list(ids: Iterable[int] | np.ndarray) -> list[int]:
    """Turn a list / 1-D numpy array / 1-D torch tensor of ids into a list of ints."""
    if hasattr(ids, "tolist"):  # numpy array or torch tensor
        out = ids.tolist()  # type: ignore[union-attr]
        if not isinstance(out, list):  # 0-d array/tensor
            out = [out]
        if out and isinstance(out[0], list):
            shape = tuple(ids.shape)  # type: ignore[union-attr]
            raise ValueError(
                f"decode expects a 1-D sequence of ids, got shape {shape}; "
                "decode each row separately."
            )
        return [int(i) for i in out]
    return [int(i) for i in ids]


# --------------------------------------------------------------------------------------
# text8 character tokenizer
# --------------------------------------------------------------------------------------

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_TABLE = {ord(str(d)): f" {w} " for d, w in enumerate(_DIGIT_WORDS)}
_NON_AZ_RUN = re.compile(r"[^a-z]+")

TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"

# Byte -> id lookup table; 255 marks bytes outside the text8 alphabet.
_TEXT8_LUT = np.full(256, 255, dtype=np.uint8)
_TEXT8_LUT[ord(" ")] = 0
_TEXT8_LUT[ord("a") : ord("z") + 1] = np.arange(1, 27, dtype=np.uint8)
_TEXT8_LUT.setflags(write=False)
_TEXT8_BYTES = np.frombuffer(TEXT8_ALPHABET.encode("ascii"), dtype=np.uint8)


def normalize_text8(text: str) -> str:
    """Normalise arbitrary text to the text8 alphabet (``a-z`` and single spaces).

    The rules follow Matt Mahoney's text8 preprocessing:

    1. lowercase (Python ``str.lower``);
    2. every ASCII digit becomes its English word with a space on each side
       (``"0" -> " zero "`` ... ``"9" -> " nine "``);
    3. every other character outside ``a-z`` becomes a space;
    4. runs of spaces collapse to one space.

    Leading/trailing spaces are kept (one at most), so normalising the concatenation
    of two strings equals concatenating their normalisations up to a shared space.

    Example: ``normalize_text8("In 1984, Orwell!") == "in one nine eight four orwell "``.
    """
    return _NON_AZ_RUN.sub(" ", text.lower().translate(_DIGIT_TABLE))


def text8_bytes_to_ids(
    raw: bytes | bytearray | memoryview | np.ndarray, *, source: str = "text"
) -> np.ndarray:
    """Map ASCII text8 bytes to ids (space=0, a..z=1..26) with validation.

    Args:
        raw: the bytes of a text8-format string (only ``a-z`` and space).
        source: what the bytes are, used in the error message.

    Returns:
        ``uint8`` array of shape ``(len(raw),)``.

    Raises:
        ValueError: naming the first offending character and its offset.
    """
    arr = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    ids = _TEXT8_LUT[arr]
    bad = np.flatnonzero(ids == 255)
    if bad.size:
        pos = int(bad[0])
        snippet = bytes(arr[max(0, pos - 20) : pos + 20]).decode("latin-1")
        raise ValueError(
            f"{source} is not in text8 format: byte {bytes([int(arr[pos])])!r} at offset {pos} "
            f"({bad.size} invalid bytes in total) near {snippet!r}. text8 contains only "
            "lowercase a-z and single spaces; clean arbitrary text with "
            "maskdiff.data.normalize_text8(text) first."
        )
    return ids


class CharTokenizer:
    """text8 character tokenizer: space = 0, ``a`` = 1, ..., ``z`` = 26 (vocab 27).

    ``encode`` is strict: it raises on any character outside ``[a-z ]`` instead of
    silently dropping it. Use :func:`normalize_text8` (or ``normalize=True``) to clean
    arbitrary text first.
    """

    name: str = "char27"
    vocab_size: int = 27
    alphabet: str = TEXT8_ALPHABET

    def encode(self, text: str, *, normalize: bool = False) -> list[int]:
        """Encode a text8-format string to a list of ids in ``[0, 27)``."""
        return self.encode_array(text, normalize=normalize).tolist()

    def encode_array(self, text: str, *, normalize: bool = False) -> np.ndarray:
        """Like :meth:`encode` but returns a ``uint8`` array of shape ``(len(text),)``."""
        if normalize:
            text = normalize_text8(text)
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"CharTokenizer.encode: character {text[e.start]!r} at offset {e.start} is "
                "outside the text8 alphabet [a-z ]; clean the text with "
                "maskdiff.data.normalize_text8(text) or pass normalize=True."
            ) from None
        return text8_bytes_to_ids(raw, source="CharTokenizer.encode input")

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decode ids in ``[0, 27)`` (list, numpy array or 1-D tensor) to a string."""
        arr = np.asarray(_as_int_list(ids), dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise ValueError(
                f"CharTokenizer.decode: id {bad} is outside [0, {self.vocab_size}); "
                "(a mask token id must be removed before decoding)."
            )
        return _TEXT8_BYTES[arr].tobytes().decode("ascii")

    def __repr__(self) -> str:
        return "CharTokenizer(vocab_size=27, space=0, a..z=1..26)"


# --------------------------------------------------------------------------------------
# GPT-2 BPE (offline, from openai-whisper's bundled ranks file)
# --------------------------------------------------------------------------------------

#: sha256 of ``whisper/assets/gpt2.tiktoken`` (openai-whisper 20250625). It is the same
#: digest tiktoken pins for ``r50k_base.tiktoken`` (``tiktoken_ext/openai_public.py``):
#: the two files are byte-identical, i.e. the GPT-2 merge ranks.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

#: GPT-2 / r50k pre-tokenisation regex (copied from ``tiktoken_ext.openai_public``).
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
_WHISPER_DIST = "openai-whisper"
_WHISPER_RANKS = "whisper/assets/gpt2.tiktoken"


def whisper_gpt2_ranks_path() -> Path | None:
    """Path of ``whisper/assets/gpt2.tiktoken`` in the installed openai-whisper, or None.

    Located from the distribution's file list (or the package's import spec) without
    importing ``whisper``.
    """
    try:
        files = importlib.metadata.files(_WHISPER_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace("\\", "/") == _WHISPER_RANKS:
            p = Path(str(f.locate()))
            if p.is_file():
                return p
    # find_spec on a top-level name locates the package without executing it.
    spec = importlib.util.find_spec("whisper")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "assets" / "gpt2.tiktoken"
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 BPE as a ``tiktoken.Encoding`` (cached; built once per process).

    Loads ``whisper/assets/gpt2.tiktoken`` from the installed ``openai-whisper``
    distribution (never importing ``whisper``), checks its sha256 against
    :data:`GPT2_RANKS_SHA256` and builds ``tiktoken.Encoding(name="gpt2", ...)`` with the
    r50k regex and ``{"<|endoftext|>": 50256}``. Only if that file is absent does it fall
    back to ``tiktoken.get_encoding("gpt2")`` (which needs a network or a tiktoken cache).

    Note: ``tiktoken.load.load_tiktoken_bpe`` keeps a copy of the ranks file in
    tiktoken's cache directory (``$TIKTOKEN_CACHE_DIR``, default ``$TMPDIR/data-gym-cache``).

    Raises:
        RuntimeError: the whisper file is present but its checksum is wrong, or the
            file is missing and the tiktoken fallback fails too.
    """
    path = whisper_gpt2_ranks_path()
    if path is not None:
        digest = sha256_file(path)
        if digest != GPT2_RANKS_SHA256:
            raise RuntimeError(
                f"GPT-2 ranks file {path} has sha256 {digest}, expected {GPT2_RANKS_SHA256} "
                "(r50k_base). The file is corrupt or from an unexpected openai-whisper "
                "version; reinstall it with `pip install --no-deps --force-reinstall "
                "openai-whisper==20250625`."
            )
        ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=GPT2_RANKS_SHA256)
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": GPT2_EOT_ID},
            explicit_n_vocab=GPT2_VOCAB_SIZE,
        )
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # network / cache errors come in many types
        raise RuntimeError(
            "Cannot build the GPT-2 tokenizer: the offline ranks file "
            f"{_WHISPER_RANKS} from the '{_WHISPER_DIST}' distribution is not installed, "
            f"and tiktoken.get_encoding('gpt2') failed ({type(e).__name__}: {e}). Install the "
            "offline file with `pip install --no-deps openai-whisper==20250625`, or make the "
            "tiktoken download available (network or $TIKTOKEN_CACHE_DIR)."
        ) from e


class GPT2Tokenizer:
    """GPT-2 BPE behind the :class:`Tokenizer` interface (vocab 50257, EOT 50256).

    ``encode`` treats the literal text ``"<|endoftext|>"`` as ordinary text (it never
    produces id 50256); documents are separated by inserting :attr:`eot_id` explicitly.
    """

    name: str = "gpt2"
    vocab_size: int = GPT2_VOCAB_SIZE
    eot_id: int = GPT2_EOT_ID

    def __init__(self) -> None:
        self.encoding: tiktoken.Encoding = gpt2_tokenizer()

    def encode(self, text: str) -> list[int]:
        """Encode text to GPT-2 ids (special-token text is encoded as plain text)."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 8) -> list[list[int]]:
        """Encode many documents in parallel threads; one id list per document."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decode ids (list, numpy array or 1-D tensor) to text (invalid UTF-8 -> U+FFFD)."""
        return self.encoding.decode(_as_int_list(ids))

    def __repr__(self) -> str:
        return "GPT2Tokenizer(vocab_size=50257, eot_id=50256)"
