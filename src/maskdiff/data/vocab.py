"""Tokenizers for one's own text (``data.corpus=files``) and how a run folder stores them.

``data.tokenizer`` names one of:

* ``byte`` -- :class:`ByteTokenizer`: the UTF-8 bytes of the text, vocabulary 256. Byte ``0xFF``
  never occurs in UTF-8, so it serves as the end-of-document / end-of-record token.
* ``char`` -- :class:`CharVocabTokenizer`: one id per character of the *training split* (sorted by
  code point), then ``<eos>`` (end of document / record) and ``<unk>``. Characters of the
  validation and test splits that the training split lacks become ``<unk>`` (counted in the data
  summary); text given at prompt time must use the vocabulary only (:class:`OutOfVocabularyError`
  names the characters).
* ``gpt2`` -- GPT-2 BPE (:class:`~maskdiff.data.tokenizers.GPT2Tokenizer`), end of text 50256.
* a path -- a local Hugging Face tokenizer: a ``tokenizer.json`` file or a folder holding one,
  read with the ``tokenizers`` library (``pip install 'maskdiff[tokenizers]'``). Its end token is
  the folder's ``tokenizer_config.json`` ``eos_token`` or the first special token among
  :data:`END_TOKENS`; without one, documents are joined with nothing between them.

Every one has ``name``, ``vocab_size``, ``eos_id``, ``records``, ``encode``, ``decode`` and
``to_dict``. With ``records=True`` (``data.records``) :meth:`decode` cuts a sequence at its first
end token, so a generated record ends where the model put its end; otherwise an end token between
documents decodes as ``<|endoftext|>``. A run folder keeps its tokenizer as ``tokenizer.json``
(:func:`tokenizer_to_dict`, :func:`read_run_tokenizer`), so sampling, evaluation and anything
built on ``maskdiff.load(run).tokenizer`` use exactly the vocabulary the model was trained with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from maskdiff.data.errors import DataError, MissingDependencyError, one_line
from maskdiff.data.tokenizers import GPT2Tokenizer, Tokenizer, _as_int_list

__all__ = [
    "ByteTokenizer",
    "CharVocabTokenizer",
    "HFTokenizer",
    "GPT2FileTokenizer",
    "OutOfVocabularyError",
    "NAMED_TOKENIZERS",
    "END_TOKENS",
    "RUN_TOKENIZER_FILE",
    "END_TEXT",
    "build_char_vocabulary",
    "hf_tokenizer_file",
    "tokenizer_from_setting",
    "tokenizer_to_dict",
    "tokenizer_from_dict",
    "read_run_tokenizer",
    "token_dtype",
]

#: ``data.tokenizer`` values that are not paths (anything else names a Hugging Face tokenizer).
NAMED_TOKENIZERS = ("byte", "char", "gpt2")
#: Special tokens taken as a Hugging Face tokenizer's end token, in this order.
END_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[EOS]", "<|im_end|>", "[SEP]")
#: The file of a run folder that holds its tokenizer (only runs on ``data.corpus=files``).
RUN_TOKENIZER_FILE = "tokenizer.json"
#: How an end token between two documents decodes (as GPT-2's end of text does).
END_TEXT = "<|endoftext|>"
_FORMAT = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids in ``[0, vocab_size)``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DataError(f"a vocabulary of {vocab_size:,} tokens is too large (at most 2^32)")


class OutOfVocabularyError(DataError):
    """Text holds characters the run's character vocabulary lacks; the message names them."""


class _OwnTokenizer:
    """What the tokenizers here share: the end token, record-aware decoding, a spec for the run folder."""

    name: str
    vocab_size: int
    eos_id: int | None
    records: bool = False

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (strict: text the vocabulary cannot hold is an error)."""
        return self.encode_document(text, strict=True)[0].tolist()

    def encode_document(self, text: str, *, strict: bool = False) -> tuple[np.ndarray, int]:
        """``(ids, n_unknown)``: the ids of one document or record as a 1-D array, and how many of
        its symbols were outside the vocabulary (mapped to ``<unk>``; 0 except for ``char``)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids`` (list, numpy array or 1-D tensor). In record mode the sequence ends at its
        first end token; otherwise end tokens decode as ``<|endoftext|>``."""
        seq = _as_int_list(ids)
        bad = [i for i in seq if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{type(self).__name__}.decode: id {bad[0]} is outside [0, {self.vocab_size}) "
                             "(a mask id must be removed before decoding)")
        if self.eos_id is None:
            return self._decode_piece(seq)
        if self.records:
            return self._decode_piece(seq[: seq.index(self.eos_id)] if self.eos_id in seq else seq)
        pieces, start = [], 0
        for k, i in enumerate(seq + [self.eos_id]):
            if i == self.eos_id:
                pieces.append(self._decode_piece(seq[start:k]))
                start = k + 1
        return END_TEXT.join(pieces)

    def _decode_piece(self, ids: list[int]) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """What ``tokenizer.json`` in a run folder holds: enough to rebuild this tokenizer exactly."""
        return {"format": _FORMAT, "kind": self.name, "records": self.records, **self._spec()}

    def _spec(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id}, records={self.records})"


class ByteTokenizer(_OwnTokenizer):
    """UTF-8 bytes (vocabulary 256); ``0xFF``, which UTF-8 never uses, is the end token.

    ``decode`` reads the bytes as UTF-8 and shows a malformed byte sequence (a sample can produce
    one) as U+FFFD."""

    name = "byte"
    vocab_size = 256
    eos_id = 0xFF

    def __init__(self, *, records: bool = False) -> None:
        self.records = records

    def encode_document(self, text: str, *, strict: bool = False) -> tuple[np.ndarray, int]:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8), 0

    def _decode_piece(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class CharVocabTokenizer(_OwnTokenizer):
    """One id per character of a fixed alphabet, then ``<eos>`` and ``<unk>``.

    Args:
        symbols: the alphabet, distinct characters; id ``i`` is ``symbols[i]``.
        records: cut decoded sequences at the first ``<eos>`` (record data).
    """

    name = "char"

    def __init__(self, symbols: Iterable[str], *, records: bool = False) -> None:
        self.symbols: tuple[str, ...] = tuple(symbols)
        if any(len(s) != 1 for s in self.symbols) or len(set(self.symbols)) != len(self.symbols):
            raise DataError("a character vocabulary must hold distinct single characters")
        self.records = records
        self.eos_id = len(self.symbols)
        self.unk_id = len(self.symbols) + 1
        self.vocab_size = len(self.symbols) + 2
        # Vectorised lookup: code points sorted, with their ids.
        points = np.array([ord(s) for s in self.symbols], dtype=np.int64)
        order = np.argsort(points, kind="stable")
        self._points, self._ids = points[order], order.astype(np.int64)
        self._dtype = token_dtype(self.vocab_size)

    def encode_document(self, text: str, *, strict: bool = False) -> tuple[np.ndarray, int]:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        if not len(self._points):
            pos = np.zeros(len(points), dtype=np.int64)
            known = np.zeros(len(points), dtype=bool)
        else:
            pos = np.minimum(np.searchsorted(self._points, points), len(self._points) - 1)
            known = self._points[pos] == points
        n_unknown = int(len(points) - known.sum())
        if n_unknown and strict:
            raise OutOfVocabularyError(self.unknown_message(text))
        ids = np.where(known, self._ids[pos] if len(self._ids) else 0, self.unk_id)
        return ids.astype(self._dtype), n_unknown

    def unknown_message(self, text: str) -> str:
        """The one-line error for ``text`` holding characters outside the vocabulary."""
        known = set(self.symbols)
        odd = sorted({c for c in text if c not in known})
        listed = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in odd[:10]) + (f" and {len(odd) - 10} more" if len(odd) > 10 else "")
        return (f"the text holds {len(odd)} character(s) outside this run's vocabulary of {len(self.symbols)} characters "
                f"(built from its training split): {listed}; remove or replace them")

    def _decode_piece(self, ids: list[int]) -> str:
        return "".join(self.symbols[i] if i < self.eos_id else "\ufffd" for i in ids)

    def _spec(self) -> dict[str, Any]:
        return {"symbols": list(self.symbols), "eos_id": self.eos_id, "unk_id": self.unk_id}


def build_char_vocabulary(characters: Iterable[str], *, records: bool = False) -> CharVocabTokenizer:
    """A :class:`CharVocabTokenizer` over the distinct ``characters``, sorted by code point."""
    return CharVocabTokenizer(sorted(set(characters)), records=records)


class GPT2FileTokenizer(_OwnTokenizer):
    """GPT-2 BPE (vocabulary 50257, end of text 50256) for ``data.corpus=files``."""

    name = "gpt2"

    def __init__(self, *, records: bool = False) -> None:
        self._gpt2 = GPT2Tokenizer()
        self.vocab_size, self.eos_id, self.records = self._gpt2.vocab_size, self._gpt2.eot_id, records

    def encode_document(self, text: str, *, strict: bool = False) -> tuple[np.ndarray, int]:
        return np.asarray(self._gpt2.encode(text), dtype=np.uint16), 0

    def _decode_piece(self, ids: list[int]) -> str:
        return self._gpt2.decode(ids)


class HFTokenizer(_OwnTokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (from its ``tokenizer.json`` text).

    Args:
        json_text: the content of ``tokenizer.json``.
        eos_token: the end token's text (None: the first of :data:`END_TOKENS` it knows, if any).
        source: where it came from, for messages.
        records: cut decoded sequences at the first end token.
    """

    name = "hf"

    def __init__(self, json_text: str, *, eos_token: str | None = None, source: str = "tokenizer.json",
                 records: bool = False) -> None:
        try:
            import tokenizers
        except ImportError as e:
            raise MissingDependencyError(
                f"data.tokenizer={source!r} is a Hugging Face tokenizer, which needs the tokenizers package: "
                "pip install 'maskdiff[tokenizers]'") from e
        try:
            self._tok = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # the library raises its own exception types
            raise DataError(f"{source} is not a Hugging Face tokenizer.json ({one_line(e)}): pass a tokenizer.json "
                            "file or a folder holding one") from e
        self._json, self.records, self.source = json_text, records, source
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        if self.vocab_size < 2:
            raise DataError(f"{source}: the tokenizer's vocabulary is empty: pass a trained tokenizer")
        candidates = [eos_token] if eos_token else list(END_TOKENS)
        self.eos_token = next((t for t in candidates if t in vocab), None)
        if eos_token and self.eos_token is None:
            raise DataError(f"{source}: its end token {eos_token!r} is not in its vocabulary")
        self.eos_id = vocab[self.eos_token] if self.eos_token is not None else None

    def encode_document(self, text: str, *, strict: bool = False) -> tuple[np.ndarray, int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=token_dtype(self.vocab_size)), 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts at once (the library encodes them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode_piece(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _spec(self) -> dict[str, Any]:
        return {"eos_token": self.eos_token, "eos_id": self.eos_id, "tokenizer_json": self._json}


def hf_tokenizer_file(setting: str) -> tuple[Path, str | None]:
    """``(tokenizer.json, eos_token from tokenizer_config.json or None)`` of a ``data.tokenizer`` path.

    Raises:
        FileNotFoundError: the path is neither a file nor a folder holding ``tokenizer.json``.
    """
    p = Path(setting).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(
            f"data.tokenizer={setting!r} is none of {', '.join(NAMED_TOKENIZERS)} and "
            f"{'holds no tokenizer.json' if p.is_dir() else 'no such file'}: pass one of them, a Hugging Face "
            "tokenizer.json, or a folder holding one")
    eos = None
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        except (ValueError, OSError, AttributeError):
            value = None
        eos = value.get("content") if isinstance(value, dict) else value
    return file, eos if isinstance(eos, str) else None


def tokenizer_from_setting(setting: str, *, records: bool = False, characters: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer a ``data.tokenizer`` value names (``char`` needs the training split's ``characters``)."""
    if setting == "byte":
        return ByteTokenizer(records=records)
    if setting == "gpt2":
        return GPT2FileTokenizer(records=records)
    if setting == "char":
        if characters is None:
            raise ValueError("data.tokenizer=char builds its vocabulary from the training split: pass characters=")
        return build_char_vocabulary(characters, records=records)
    file, eos = hf_tokenizer_file(setting)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot be read as UTF-8 text ({one_line(e)}): pass a tokenizer.json") from e
    return HFTokenizer(text, eos_token=eos, source=str(file), records=records)


def tokenizer_to_dict(tokenizer: Any) -> dict[str, Any]:
    """The run-folder form of an own-data tokenizer (see :meth:`_OwnTokenizer.to_dict`)."""
    return tokenizer.to_dict()


def tokenizer_from_dict(spec: dict[str, Any], *, source: str = RUN_TOKENIZER_FILE) -> Tokenizer:
    """Rebuild a tokenizer from :func:`tokenizer_to_dict`'s output.

    Raises:
        DataError: naming ``source``, when the spec is not one this version can read.
    """
    try:
        kind, records = spec["kind"], bool(spec.get("records", False))
        if spec.get("format") != _FORMAT:
            raise ValueError(f"format {spec.get('format')!r}, expected {_FORMAT}")
        if kind == "byte":
            return ByteTokenizer(records=records)
        if kind == "gpt2":
            return GPT2FileTokenizer(records=records)
        if kind == "char":
            tok = CharVocabTokenizer(spec["symbols"], records=records)
            if (tok.eos_id, tok.unk_id) != (spec["eos_id"], spec["unk_id"]):
                raise ValueError("its end/unknown ids do not follow its symbols")
            return tok
        if kind == "hf":
            return HFTokenizer(spec["tokenizer_json"], eos_token=spec.get("eos_token"), source=source, records=records)
        raise ValueError(f"unknown kind {kind!r}")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{source} does not describe a tokenizer ({one_line(e)}); restore the file the run was "
                        "trained with") from None


def read_run_tokenizer(folder: str | os.PathLike[str]) -> Tokenizer | None:
    """The tokenizer stored in ``folder/tokenizer.json``, or None when the folder has none (runs on
    built-in corpora, whose tokenizer follows from ``data.corpus``).

    Raises:
        DataError: the file exists but is not readable JSON or not a tokenizer spec (names the file).
    """
    file = Path(folder) / RUN_TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{file} is not readable JSON ({one_line(e)}); restore the file the run was trained with") from None
    if not isinstance(spec, dict):
        raise DataError(f"{file}: a JSON object is expected; restore the file the run was trained with")
    return tokenizer_from_dict(spec, source=str(file))
