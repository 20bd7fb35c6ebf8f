"""Zero-shot perplexity of a GPT-2-token model on LAMBADA, WikiText-2/103, PTB and One Billion Words.

This is the evaluation of GPT-2 (Radford et al., 2019) as the diffusion-LM papers run it — SEDD
(Lou et al., 2024), MDLM (Sahoo et al., 2024) and MD4 (Shi et al., 2024) — for a model trained
on another corpus (OpenWebText): the NELBO of each evaluation sequence gives an upper bound on
its negative log-likelihood, and ``exp(nats per token)`` an upper bound on perplexity.

Data sets (:data:`DATASETS`; the Hugging Face names the papers' code loads, in forms that
``datasets`` 4 and later still read — they no longer run loading scripts):

=========== =============================== ==================== ========== ===========
key         Hub data set                    config               column     detokeniser
=========== =============================== ==================== ========== ===========
lambada     EleutherAI/lambada_openai       default (test only)  text       lambada
wikitext2   Salesforce/wikitext             wikitext-2-raw-v1    text       wikitext
wikitext103 Salesforce/wikitext             wikitext-103-raw-v1  text       wikitext
ptb         ptb-text-only/ptb_text_only     penn_treebank        sentence   ptb
lm1b        billion-word-benchmark/lm1b     plain_text           text       lm1b
=========== =============================== ==================== ========== ===========

(MDLM's and SEDD's code load ``wikitext`` with the *raw* configs, ``ptb_text_only``, ``lm1b``, and
OpenAI's ``lambada_test.jsonl``, which is the ``default`` config of EleutherAI/lambada_openai.)

LAMBADA and WikiText are Parquet repositories and load by name. PTB and LM1B are loading-script
repositories; they are read from the Hub's Parquet export (branch ``refs/convert/parquet``, files
``<config>/<split>/*.parquet``). Hub data are streamed (only the split's files are read); with
``streaming=False`` ``datasets`` downloads and caches the whole config (all its splits), which
later offline runs can reuse. ``path=`` reads a local copy instead — needed offline: a file, a
glob or a folder, in any of the forms the data sets come in: Parquet (a Hub snapshot or the
Parquet export, e.g. ``wikitext-2-raw-v1/test-00000-of-00001.parquet``), JSON lines (OpenAI's
``lambada_test.jsonl``), or plain text, one row per line (``wiki.test.raw``, ``ptb.test.txt``,
the LM1B ``heldout`` shards). In a folder the files of the split are picked by name (``test`` /
``heldout``, ``validation`` / ``valid``, ``train``), below a sub-folder named after the config when
there is one; a file or glob is read as the split whatever its name. Plain-text lines become
rows as the Hub builders made them: WikiText rows keep their line break and a blank line becomes
``""``; PTB and LM1B lines are stripped.

Split: ``test`` by default (LAMBADA has only a test split; LM1B only train and test). Note that
MDLM's code evaluates the *validation* split of WikiText and PTB (``dataloader.py``:
``validation_split = 'test'`` only for text8/lm1b/ag_news); pass ``split="validation"`` to match.

Detokenisers (:func:`detokenize_wikitext`, :func:`detokenize_ptb`, :func:`detokenize_lm1b`,
:func:`detokenize_lambada`) undo the data sets' tokenisation before GPT-2 BPE, with the
behaviour of ``wt_detokenizer``, ``ptb_detokenizer``, ``lm1b_detokenizer`` and
``lambada_detokenizer`` in SEDD's ``data.py`` and MDLM's ``dataloader.py`` (the two are identical;
the WikiText one descends from Megatron-LM's zero-shot GPT-2 evaluation, the LAMBADA one is
OpenAI's, quoted in openai/gpt-2 issue #131). They are applied to each row of the data set.

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
    the diffusion, reconstruction and prior terms are summed over the scored positions only.
    That sum is the NELBO of the model in which the unscored positions are known (a point mass
    on their value): a valid upper bound on ``-log p(row | its length)``. MDLM scores its BOS
    and EOS and excludes its ``[PAD]`` token (an extra id) through the attention mask; here the
    padding is EOT, which the model knows, and the BOS is left out by default.

Empty rows (WikiText's blank lines) are kept, as SEDD and MDLM keep them (each is then just an
EOT in the stream, or a one-token sequence); ``skip_empty=True`` drops them.

Estimates (:func:`zeroshot_perplexity`): each sequence's NELBO is estimated with
``num_time_draws`` time/mask draws (continuous time, or discrete time with ``num_steps``), as in
:func:`maskdiff.evaluate.evaluate_nelbo`, with the same per-batch seeding. Nats per token are
``Σ_i y_i / Σ_i n_i`` over sequences i (y_i the mean NELBO of the draws, n_i its scored tokens),
the literature's token-weighted average. Its standard error is the ratio estimator's,
``sqrt(Σ_i (y_i - R n_i)² / (N (N-1))) / mean(n)`` (for ``concat`` with every n_i = seq_len this is
exactly :func:`~maskdiff.evaluate.evaluate_nelbo`'s), covering Monte Carlo noise and the
variation between sequences. ``perplexity`` = exp(nats per token), an upper bound (up to that
error) on the model's perplexity, and its interval is ``exp`` of the nats interval. The
continuous-time estimate is heavy-tailed (the weight w(t) ≈ 1/t meets rare masks at small t), so
with few sequences the sample standard error tends to be too small; use several draws.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from maskdiff import runs
from maskdiff.data.hf import import_datasets, resolve_local_files
from maskdiff.fileio import write_json_atomic
from maskdiff.data.tokenizers import GPT2_EOT_ID, GPT2_VOCAB_SIZE, GPT2Tokenizer
from maskdiff.metrics import LN2

__all__ = [
    "ZeroShotDataset",
    "DATASETS",
    "CONVENTIONS",
    "get_dataset",
    "detokenize_wikitext",
    "detokenize_ptb",
    "detokenize_lm1b",
    "detokenize_lambada",
    "DETOKENIZERS",
    "load_rows",
    "ZeroShotSequences",
    "concat_blocks",
    "pad_sequences",
    "build_sequences",
    "sequence_nelbo_terms",
    "check_gpt2_model",
    "evaluate_sequences",
    "zeroshot_perplexity",
    "format_zeroshot_table",
    "run_zeroshot",
]

CONVENTIONS = ("concat", "pad")

# ----------------------------------------------------------------------------------------------
# Detokenisers


_Rule = tuple["str | re.Pattern[str]", str]


def _apply_rules(text: str, rules: Iterable[_Rule]) -> str:
    """Apply (pattern, replacement) rules in order: plain strings by ``str.replace``, compiled
    patterns by ``re.sub``."""
    for pattern, replacement in rules:
        if isinstance(pattern, str):
            text = text.replace(pattern, replacement)
        else:
            text = pattern.sub(replacement, text)
    return text


def _hug(open_char: str, close_char: str) -> _Rule:
    """Rule removing the spaces just inside a pair of brackets/quotes: ``( a b )`` -> ``(a b)``.

    The contents are the shortest run without the closing character.
    """
    o, c = re.escape(open_char), re.escape(close_char)
    return re.compile(rf"{o}\s*([^{c}]*?)\s*{c}"), open_char + r"\1" + close_char


_WIKITEXT_RULES: tuple[_Rule, ...] = (
    ("s '", "s'"),  # plural possessive: "players ' union" -> "players' union"
    # The reference writes this pattern between literal slashes, so it only ever matches the text
    # "/' <digit>/" (which it replaces by the literal "/'[0-9]/"): a no-op on real data, kept for
    # identical behaviour.
    (re.compile(r"/' [0-9]/"), "/'[0-9]/"),
    (" @-@ ", "-"),  # 1 @,@ 000 @.@ 5 -> 1,000.5 ; state @-@ of -> state-of
    (" @,@ ", ","),
    (" @.@ ", "."),
    *((f" {p} ", f"{p} ") for p in ":;.!?,"),  # no space before punctuation that a space follows
    _hug("(", ")"),
    _hug("[", "]"),
    _hug("{", "}"),
    _hug('"', '"'),
    _hug("'", "'"),
    ("= = = =", "===="),  # section headings: " = = Career = = " -> " == Career == "
    ("= = =", "==="),
    ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
)


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenisation (the literature's ``wt_detokenizer``).

    In order: ``s '`` → ``s'``; the number separators `` @-@ ``, `` @,@ ``, `` @.@ `` → ``-``,
    ``,``, ``.``; a space before ``: ; . ! ? ,`` (each followed by a space) is removed; spaces inside
    ``( )``, ``[ ]``, ``{ }``, ``" "`` and ``' '`` pairs are removed; heading markers ``= = = =``,
    ``= = =``, ``= =`` are joined; `` ° `` → ``°``; spaces next to line breaks are removed;
    `` N `` → `` 1 ``; `` 's`` → ``'s``.
    """
    return _apply_rules(text, _WIKITEXT_RULES)


def detokenize_ptb(text: str) -> str:
    """Undo Penn Treebank's tokenisation (the literature's ``ptb_detokenizer``).

    `` 's`` → ``'s``; ``s ' `` → ``s' ``; `` n't`` → ``n't``; `` \\n `` → ``\\n``; ``\\/`` → ``/``;
    the number placeholder `` N `` → `` 1 `` (repeated, at most 10 passes, so runs ``N N N`` all
    change); ``$ 1`` → ``$1``; ``# 1`` → ``#1``; ``<unk>`` → ``?``.
    """
    for old, new in ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")):
        text = text.replace(old, new)
    for _ in range(10):  # str.replace does not see overlapping matches (" N N ")
        replaced = text.replace(" N ", " 1 ")
        if replaced == text:
            break
        text = replaced
    for old, new in (("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?")):
        text = text.replace(old, new)
    return text


_LM1B_RULES: tuple[_Rule, ...] = (
    ("http : / / ", "http://"),
    ("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), r"'\1"),  # "John 's" -> "John's", "do n't" stays (no word after ')
    (re.compile(r" (\w+) \. "), r" \1. "),  # "word . Next" -> "word. Next"
    (re.compile(r" (\w+) \.$"), r" \1."),  # sentence-final period
    (" ? ", "? "),
    (re.compile(r" \?$"), "?"),
    (" ! ", "! "),
    (re.compile(r" \!$"), "!"),
    (" , ", ", "),
    (" : ", ": "),
    (" ; ", "; "),
    (" / ", "/"),
    (re.compile(r'" ([^"]+) "'), r'"\1"'),
    (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^()]+) \)"), r"(\1)"),
    (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"),
    ("\N{POUND SIGN} ", "\N{POUND SIGN}"),
)


def detokenize_lm1b(text: str) -> str:
    """Undo One Billion Words' tokenisation (the literature's ``lm1b_detokenizer``).

    ``http : / /`` → ``http://``; a space before an apostrophe followed by a word is removed
    (``John 's`` → ``John's``); a space before ``.`` after a word, before ``?``/``!`` (mid-sentence
    or final), before ``,``, ``:``, ``;`` is removed; `` / `` → ``/``; spaces just inside ``" "``,
    ``' '``, ``( )``, ``[ ]`` are removed; ``$ `` → ``$``, ``£ `` → ``£``.
    """
    return _apply_rules(text, _LM1B_RULES)


def detokenize_lambada(text: str) -> str:
    """OpenAI's LAMBADA preprocessing: curly double quotes → ``"``; a line break, then the
    stripped passage."""
    text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
    return "\n" + text.strip()


#: Detokenisers by name.
DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": detokenize_wikitext,
    "ptb": detokenize_ptb,
    "lm1b": detokenize_lm1b,
    "lambada": detokenize_lambada,
}

# ----------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class ZeroShotDataset:
    """One zero-shot data set: where it lives on the Hub, its column and its detokeniser.

    Attributes:
        key: short name (``"wikitext2"``). title: display name.
        hub_id, config: ``datasets.load_dataset(hub_id, config, split=...)``.
        splits: the splits it has; default_split: the one evaluated by default.
        text_column: the column holding the text (``"sentence"`` for PTB).
        detokenizer: a key of :data:`DETOKENIZERS`.
        parquet_export: the Hub repository is script-based; read its Parquet export
            (``refs/convert/parquet``: ``<config>/<split>/*.parquet``) instead of the script.
        keep_linebreaks: plain-text lines keep their line break (WikiText's Hub rows do), and
            blank lines become ``""``; otherwise lines are stripped.
        local_forms: the local file forms accepted by ``path=`` (for messages and docs).
        aliases: other accepted names.
    """

    key: str
    title: str
    hub_id: str
    config: str | None
    splits: tuple[str, ...]
    default_split: str
    text_column: str
    detokenizer: str
    parquet_export: bool = False
    keep_linebreaks: bool = False
    local_forms: str = ""
    aliases: tuple[str, ...] = field(default=())

    def detokenize(self, text: str) -> str:
        return DETOKENIZERS[self.detokenizer](text)

    def hub_parquet_glob(self, split: str) -> str:
        """``hf://`` glob of the Parquet export of ``split`` (script-based repositories)."""
        return f"hf://datasets/{self.hub_id}@refs%2Fconvert%2Fparquet/{self.config}/{split}/*.parquet"


DATASETS: dict[str, ZeroShotDataset] = {
    d.key: d
    for d in (
        ZeroShotDataset(
            "lambada", "LAMBADA", "EleutherAI/lambada_openai", "default", ("test",), "test", "text", "lambada",
            local_forms="Parquet with a 'text' column (default/test/*.parquet) or OpenAI's lambada_test.jsonl",
            aliases=("lambada_openai", "lambada-openai"),
        ),
        ZeroShotDataset(
            "wikitext2", "WikiText-2", "Salesforce/wikitext", "wikitext-2-raw-v1", ("train", "validation", "test"),
            "test", "text", "wikitext", keep_linebreaks=True,
            local_forms="Parquet with a 'text' column (wikitext-2-raw-v1/test-00000-of-00001.parquet) or the "
            "raw file wiki.test.raw from wikitext-2-raw-v1.zip",
            aliases=("wikitext-2", "wt2", "wikitext-2-raw-v1"),
        ),
        ZeroShotDataset(
            "wikitext103", "WikiText-103", "Salesforce/wikitext", "wikitext-103-raw-v1",
            ("train", "validation", "test"), "test", "text", "wikitext", keep_linebreaks=True,
            local_forms="Parquet with a 'text' column (wikitext-103-raw-v1/test-00000-of-00001.parquet) or the "
            "raw file wiki.test.raw from wikitext-103-raw-v1.zip",
            aliases=("wikitext-103", "wt103", "wikitext-103-raw-v1"),
        ),
        ZeroShotDataset(
            "ptb", "PTB", "ptb-text-only/ptb_text_only", "penn_treebank", ("train", "validation", "test"), "test",
            "sentence", "ptb", parquet_export=True,
            local_forms="Parquet with a 'sentence' column (penn_treebank/test/0000.parquet) or ptb.test.txt "
            "(one sentence per line)",
            aliases=("ptb_text_only", "penn-treebank", "penn_treebank"),
        ),
        ZeroShotDataset(
            "lm1b", "One Billion Words", "billion-word-benchmark/lm1b", "plain_text", ("train", "test"), "test",
            "text", "lm1b", parquet_export=True,
            local_forms="Parquet with a 'text' column (plain_text/test/0000.parquet) or the heldout shards "
            "news.en.heldout-000NN-of-00050 (one sentence per line)",
            aliases=("1bw", "lm1b-gpt2", "one-billion-words", "billion-word-benchmark"),
        ),
    )
}


def get_dataset(name: str) -> ZeroShotDataset:
    """The registry entry of ``name`` (a key of :data:`DATASETS` or an alias, case-insensitive)."""
    key = name.strip().lower()
    for spec in DATASETS.values():
        if key == spec.key or key in spec.aliases:
            return spec
    raise ValueError(f"unknown zero-shot data set {name!r}; choose from {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------
# Loading rows

_SPLIT_WORDS = {
    "test": ("test", "heldout"),
    "validation": ("validation", "valid", "val", "dev"),
    "train": ("train", "training"),
}
_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_IGNORED_SUFFIXES = (".md", ".py", ".lock", ".duckdb", ".yaml", ".yml", ".sha256", ".gitattributes")


def _file_format(path: Path) -> str:
    """``datasets`` builder for a file: parquet/json/csv/arrow by suffix, else plain text lines."""
    name = path.name.lower()
    for comp in _COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    return _FORMATS.get(os.path.splitext(name)[1], "text")


def _names_split(relative: Path, split: str) -> bool:
    words = set(re.split(r"[^a-z]+", str(relative).lower()))
    return any(w in words for w in _SPLIT_WORDS.get(split, (split,)))


def _local_files(spec: ZeroShotDataset, path: str | os.PathLike[str], split: str) -> list[Path]:
    """The data files named by ``path``; in a folder, those of ``split`` (see the module docs)."""

    root = Path(path).expanduser()
    files = resolve_local_files(root)  # a file, a glob or a folder (recursive); raises if empty
    if not root.is_dir():
        return files
    if spec.config and (root / spec.config).is_dir():
        root = root / spec.config
        files = [f for f in files if root in f.parents]
    files = [f for f in files if not f.name.lower().endswith(_IGNORED_SUFFIXES) and f.name.lower() != "license"]
    chosen = [f for f in files if _names_split(f.relative_to(root), split)]
    if not chosen:
        words = "/".join(_SPLIT_WORDS.get(split, (split,)))
        raise FileNotFoundError(
            f"{spec.title}: no file of split {split!r} under {str(path)!r} (looked for names containing "
            f"{words}); pass the file itself as path=. Accepted forms: {spec.local_forms}"
        )
    return chosen


def _open_local(spec: ZeroShotDataset, files: list[Path]) -> Any:
    datasets = import_datasets()

    kinds = {_file_format(f) for f in files}
    if len(kinds) != 1:
        raise ValueError(f"{spec.title}: the files mix formats {sorted(kinds)}: {[str(f) for f in files]}")
    builder = kinds.pop()
    kwargs: dict[str, Any] = {"data_files": [str(f) for f in files], "split": "train", "streaming": True}
    if builder == "text":
        kwargs["keep_linebreaks"] = spec.keep_linebreaks
    return datasets.load_dataset(builder, **kwargs), builder


def _open_hub(spec: ZeroShotDataset, split: str, cache_dir: str | None, revision: str | None,
              streaming: bool) -> Any:
    datasets = import_datasets()

    if spec.parquet_export:
        return datasets.load_dataset("parquet", data_files={split: spec.hub_parquet_glob(split)}, split=split,
                                     cache_dir=cache_dir, streaming=streaming)
    return datasets.load_dataset(spec.hub_id, spec.config, split=split, cache_dir=cache_dir, revision=revision,
                                 streaming=streaming)


class _ColumnError(ValueError):
    """The text column is missing."""


def _pick_column(spec: ZeroShotDataset, columns: Iterable[str], text_column: str | None) -> str:
    columns = list(columns)
    candidates = [text_column] if text_column else [spec.text_column, "text"]
    for c in candidates:
        if c in columns:
            return c
    raise _ColumnError(
        f"{spec.title}: no column {' or '.join(repr(c) for c in candidates)} in the data (columns "
        f"{sorted(columns)}); pass text_column=<name>"
    )


def _hub_error(spec: ZeroShotDataset, split: str, e: BaseException) -> RuntimeError:
    offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    where = spec.hub_parquet_glob(split) if spec.parquet_export else f"{spec.hub_id} ({spec.config})"
    return RuntimeError(
        f"could not load {spec.title} split {split!r} from the Hugging Face Hub ({where}): {type(e).__name__}: {e}. "
        + ("Hub access is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). " if offline else "")
        + f"Download the data elsewhere and pass path=<file or folder> (command line: --path {spec.key}=FILE). "
        f"Accepted forms: {spec.local_forms}."
    )


def load_rows(
    name: str | ZeroShotDataset,
    *,
    path: str | os.PathLike[str] | None = None,
    split: str | None = None,
    text_column: str | None = None,
    max_rows: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    streaming: bool = True,
) -> tuple[list[str], dict[str, Any]]:
    """The raw rows (before detokenisation) of a zero-shot data set, in order, and their source.

    Reads ``path`` (file, glob or folder; see the module docs) when given, else the Hugging Face
    Hub: streamed by default; ``streaming=False`` downloads the config into ``datasets``' cache
    (``cache_dir``, default its own), which later offline runs reuse. ``revision`` pins a Hub
    revision (Parquet repositories only). ``max_rows`` reads only the first rows. A missing value
    in the text column counts as an empty row.

    Raises:
        RuntimeError: the Hub could not be reached (offline) and no ``path`` was given — the
            message names the ``path=`` option and the file forms it accepts.
    """
    spec = name if isinstance(name, ZeroShotDataset) else get_dataset(name)
    split = split or spec.default_split
    if split not in spec.splits:
        raise ValueError(f"{spec.title} has splits {list(spec.splits)}, not {split!r}")

    def read(ds: Any) -> tuple[list[str], str | None]:
        rows: list[str] = []
        column = None
        for batch in ds.iter(batch_size=1024):
            if column is None:
                column = _pick_column(spec, batch.keys(), text_column)
            texts = batch[column]
            if max_rows is not None:
                texts = texts[: max_rows - len(rows)]
            rows.extend("" if t is None else str(t) for t in texts)
            if max_rows is not None and len(rows) >= max_rows:
                break
        return rows, column

    if path is not None:
        files = _local_files(spec, path, split)
        ds, builder = _open_local(spec, files)
        source: dict[str, Any] = {"kind": "local", "files": [str(f) for f in files], "format": builder}
        rows, column = read(ds)
    else:
        try:  # a streamed data set meets the network only while it is read
            rows, column = read(_open_hub(spec, split, None if cache_dir is None else str(cache_dir), revision,
                                          streaming))
        except _ColumnError:
            raise
        except Exception as e:  # network, offline mode, missing cache: many exception types
            raise _hub_error(spec, split, e) from e
        source = {"kind": "hub", "hub_id": spec.hub_id, "config": spec.config, "revision": revision,
                  "parquet_export": spec.parquet_export, "streaming": streaming}
    source["split"] = split
    if path is not None and source["format"] == "text":
        # Plain-text lines as the Hub builders made them: WikiText rows keep the line break and
        # a blank line is ""; PTB and LM1B lines are stripped.
        rows = [r if r.strip() else "" for r in rows] if spec.keep_linebreaks else [r.strip() for r in rows]
    source["column"] = column
    source["n_rows"] = len(rows)
    return rows, source


# ----------------------------------------------------------------------------------------------
# Block conventions


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


# ----------------------------------------------------------------------------------------------
# NELBO over the scored positions


def sequence_nelbo_terms(
    model: Any,
    x: Tensor,
    score_mask: Tensor,
    *,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
) -> dict[str, Tensor]:
    """One Monte Carlo draw of the NELBO terms of ``x`` summed over the positions in ``score_mask``.

    ``model`` is a :class:`maskdiff.model.MaskedDiffusion` (MD4, GenMD4 or the AR baseline). The
    whole of ``x`` is the input and is masked as in training; the diffusion, reconstruction and
    prior terms of unscored positions are left out, which gives the NELBO of the model in which
    those positions are known (see the module docs). The random draws are taken in the same order
    as ``model(x)``, so with an all-True mask the result equals ``model(x, generator=...)``.

    Returns ``diffusion``, ``reconstruction``, ``prior`` and ``nelbo``, nats per sequence (B,).
    """
    from maskdiff.forward import discretize_time, forward_sample, rescale_time, sample_times
    from maskdiff.losses import genmd4_diffusion_integrand, genmd4_reconstruction, masked_cross_entropy

    method = getattr(model, "method", None)
    if method not in ("md4", "genmd4", "ar") or not hasattr(model, "network"):
        raise TypeError(
            "scoring part of a sequence needs a maskdiff.model.MaskedDiffusion (method md4, genmd4 or ar); "
            f"got {type(model).__name__}. Use convention='concat' with drop_last=True, which calls model(x)."
        )
    score = score_mask.to(device=x.device, dtype=torch.bool)
    weight_mask = score.to(torch.float64)
    batch, vocab = x.shape[0], int(model.vocab_size)
    network, schedule = model.network, model.schedule
    if method == "ar":
        bos = torch.full_like(x[:, :1], vocab)
        logits = network(torch.cat([bos, x[:, :-1]], dim=1), None).float()
        nll = F.cross_entropy(logits.flatten(0, 1), x.flatten().long(), reduction="none").view(x.shape)
        nll = (nll * score).sum(1)
        zero = torch.zeros_like(nll)
        return {"diffusion": nll, "reconstruction": zero, "prior": zero, "nelbo": nll}
    log_v = math.log(vocab)
    if method == "genmd4":
        if num_steps is not None:
            raise ValueError("GenMD4 has a continuous-time objective only; leave num_steps unset")
        t1 = model.t1
        u = sample_times(batch, antithetic=model.antithetic, generator=generator, device=x.device,
                         dtype=torch.float64)
        t = rescale_time(u, t1).float()
        x2, t2 = torch.cat([x, x], dim=0), torch.cat([t, t], dim=0)
        with torch.no_grad():
            z2 = forward_sample(x2, t2, schedule, mask_id=vocab, generator=generator)
        masked = (z2 == vocab) & torch.cat([score, score], dim=0)
        logits = network(z2, t2)
        ell = (1.0 - t1) * genmd4_diffusion_integrand(logits, x2, masked, t2, schedule)
        diffusion = 0.5 * (ell[:batch] + ell[batch:])
        per_position = genmd4_reconstruction(x.reshape(-1, 1), schedule, t1).view(x.shape)
        reconstruction = (per_position * score).sum(1)
        prior = (torch.full(x.shape, schedule.eps * log_v, device=x.device) * score).sum(1)
        return {"diffusion": diffusion, "reconstruction": reconstruction, "prior": prior,
                "nelbo": diffusion + reconstruction + prior}
    # MD4 (md4_loss_terms restricted to the scored positions)
    u = sample_times(batch, antithetic=model.antithetic, generator=generator, device=x.device, dtype=torch.float64)
    if num_steps is None:
        t = u
    else:
        t, s = discretize_time(u, num_steps)
    z = forward_sample(x, t, schedule, mask_id=vocab, generator=generator)
    masked = (z == vocab) & score
    logits = network(z, t.float())
    ce = masked_cross_entropy(logits, x, masked)
    if num_steps is None:
        weight = schedule.weight(t, x)
    else:
        alpha_t, alpha_s = schedule.alpha(t, x), schedule.alpha(s, x)
        weight = num_steps * (alpha_s - alpha_t) / (1.0 - alpha_t)
    diffusion = (weight.to(ce.dtype) * ce).flatten(1).sum(1)
    zeros = torch.zeros(batch, dtype=torch.float64, device=x.device)
    alpha0 = schedule.alpha(zeros, x).detach()
    alpha1 = schedule.alpha(zeros + 1.0, x).detach()
    reconstruction = ((1.0 - alpha0) * log_v * weight_mask).flatten(1).sum(1).float()
    prior = (alpha1 * log_v * weight_mask).flatten(1).sum(1).float()
    return {"diffusion": diffusion, "reconstruction": reconstruction, "prior": prior,
            "nelbo": diffusion + reconstruction + prior}


# ----------------------------------------------------------------------------------------------
# Zero-shot perplexity


def _model_vocab_size(model: Any) -> int | None:
    for obj in (model, getattr(model, "network", None)):
        v = getattr(obj, "vocab_size", None)
        if v is not None:
            return int(v)
    return None


def _model_seq_len(model: Any) -> int | None:
    for obj in (getattr(model, "network", None), model):
        v = getattr(obj, "seq_len", None)
        if v is not None:
            return int(v)
    return None


def check_gpt2_model(model: Any) -> None:
    """Raise ValueError unless ``model`` predicts the GPT-2 vocabulary (50257 tokens)."""
    v = _model_vocab_size(model)
    if v == GPT2_VOCAB_SIZE:
        return
    kind = " — a character-level model (text8 / wiki-char alphabet)" if v is not None and v <= 256 else ""
    raise ValueError(
        f"zero-shot perplexity needs a model over the GPT-2 vocabulary (vocab_size {GPT2_VOCAB_SIZE}); this "
        f"model has vocab_size {v}{kind}. Evaluate a model trained on GPT-2 tokens (e.g. the wiki-gpt2 or "
        "OpenWebText presets)."
    )


@torch.no_grad()
def evaluate_sequences(
    model: Any,
    sequences: ZeroShotSequences,
    *,
    batch_size: int = 8,
    num_time_draws: int = 1,
    num_steps: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """NELBO per scored token of ``sequences``, with error bars (see the module docs).

    Batches whose every position is scored call ``model(x, generator=, num_steps=)``, like
    :func:`~maskdiff.evaluate.evaluate_nelbo` (same seeding, so ``concat`` blocks give the same
    numbers); others go through :func:`sequence_nelbo_terms`.
    """
    if num_time_draws < 1:
        raise ValueError(f"num_time_draws must be at least 1, got {num_time_draws}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    generator = torch.Generator(device=device)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    n_seq = len(sequences)
    per_seq: list[Tensor] = []
    within_var: list[Tensor] = []
    terms_sum = {"diffusion": 0.0, "reconstruction": 0.0, "prior": 0.0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=math.ceil(n_seq / batch_size), desc="zero-shot", unit="batch")
    for index, start in enumerate(range(0, n_seq, batch_size)):
        generator.manual_seed(seed * 1_000_003 + index)
        x = torch.from_numpy(sequences.tokens[start : start + batch_size].astype(np.int64)).to(device)
        mask = torch.from_numpy(sequences.score_mask[start : start + batch_size]).to(device)
        full = bool(mask.all())
        draws = []
        for _ in range(num_time_draws):
            with autocast:
                if full:
                    terms = model(x, generator=generator, num_steps=num_steps)
                else:
                    terms = sequence_nelbo_terms(model, x, mask, generator=generator, num_steps=num_steps)
            draws.append(terms["nelbo"].double())
            for key in terms_sum:
                terms_sum[key] += float(terms[key].double().sum()) / num_time_draws
        stacked = torch.stack(draws)  # (K, b)
        per_seq.append(stacked.mean(0).cpu())
        if num_time_draws > 1:
            within_var.append((stacked.var(0, unbiased=True) / num_time_draws).cpu())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if was_training and hasattr(model, "train"):
        model.train()
    y = torch.cat(per_seq).numpy()
    n = sequences.score_mask.sum(1).astype(np.float64)
    total_tokens = float(n.sum())
    if total_tokens == 0:
        raise ValueError("no scored tokens")
    ratio = float(y.sum() / total_tokens)
    count = y.size
    if count > 1:
        resid = y - ratio * n
        stderr = math.sqrt(float((resid**2).sum()) / (count * (count - 1))) / float(n.mean())
    else:
        stderr = float("inf")
    z95 = 1.959963984540054
    lo, hi = ratio - z95 * stderr, ratio + z95 * stderr
    result: dict[str, Any] = {
        "nats_per_token": ratio,
        "stderr_nats": stderr,
        "ci95_nats": [lo, hi],
        "bits_per_token": ratio / LN2,
        "stderr": stderr / LN2,
        "ci95": [lo / LN2, hi / LN2],
        "perplexity": math.exp(ratio),
        "perplexity_ci95": [math.exp(lo), _safe_exp(hi)],
        "n_sequences": count,
        "n_scored_tokens": int(total_tokens),
        "seq_len": sequences.seq_len,
        "num_time_draws": num_time_draws,
        "num_steps": num_steps,
        "seed": seed,
        "terms_nats_per_token": {k: v / total_tokens for k, v in terms_sum.items()},
    }
    if num_time_draws > 1:
        result["mc_stderr_nats"] = math.sqrt(float(torch.cat(within_var).sum())) / total_tokens
    return result


def _safe_exp(v: float) -> float:
    return math.exp(v) if v < 700 else float("inf")


def zeroshot_perplexity(
    model: Any,
    name: str,
    *,
    seq_len: int | None = None,
    convention: str = "concat",
    path: str | os.PathLike[str] | None = None,
    split: str | None = None,
    batch_size: int = 8,
    num_time_draws: int = 1,
    num_steps: int | None = None,
    seed: int = 0,
    max_sequences: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    drop_last: bool = True,
    score_bos: bool = False,
    skip_empty: bool = False,
    text_column: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    streaming: bool = True,
) -> dict[str, Any]:
    """Zero-shot NELBO perplexity bound of a GPT-2-vocabulary model on data set ``name``.

    Args:
        model: a :class:`maskdiff.model.MaskedDiffusion` (or any module with ``vocab_size`` 50257
            and ``model(x, generator=, num_steps=)`` returning per-sequence ``nelbo``; partly scored
            sequences need a MaskedDiffusion).
        name: ``lambada``, ``wikitext2``, ``wikitext103``, ``ptb`` or ``lm1b`` (or an alias).
        seq_len: block / sequence length; default the model's ``seq_len``.
        convention: ``"concat"`` (documents joined with EOT, cut into blocks; every token scored)
            or ``"pad"`` (one row per sequence, EOT-padded; the row's tokens and closing EOT
            scored). See the module docs for exactly which tokens count.
        path: local copy of the data (file, glob or folder); default the Hugging Face Hub.
        split: default the data set's test split.
        batch_size, num_time_draws, num_steps, seed, device, autocast_dtype, progress: as in
            :func:`maskdiff.evaluate.evaluate_nelbo`.
        max_sequences: evaluate only the first N blocks / sequences.
        drop_last: ``concat``: drop the trailing partial block (else pad it, scoring its real tokens).
        score_bos: ``pad``: also score the leading EOT (as MDLM counts its BOS).
        skip_empty: drop empty rows (kept by default, as in the literature).
        text_column, cache_dir, revision, streaming: see :func:`load_rows`.

    Returns:
        dict with ``perplexity`` (= exp(``nats_per_token``), an upper bound), ``perplexity_ci95``,
        ``nats_per_token``, ``stderr_nats``, ``ci95_nats``, ``bits_per_token``, ``stderr`` and
        ``ci95`` (bits), ``mc_stderr_nats`` (K ≥ 2), the counts (``n_documents``,
        ``n_sequences``, ``n_scored_tokens``, ``n_truncated``, ``n_unscored_tail``), the terms per
        token and the settings (data set, source, split, convention, ``scored``).
    """
    spec = get_dataset(name)
    check_gpt2_model(model)
    model_len = _model_seq_len(model)
    if seq_len is None:
        if model_len is None:
            raise ValueError("pass seq_len: the model does not say its sequence length")
        seq_len = model_len
    elif model_len is not None and seq_len > model_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's sequence length {model_len}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    t0 = time.perf_counter()
    rows, source = load_rows(spec, path=path, split=split, text_column=text_column, cache_dir=cache_dir,
                             revision=revision, streaming=streaming)
    sequences = build_sequences(rows, seq_len=seq_len, convention=convention, detokenize=spec.detokenize,
                                drop_last=drop_last, score_bos=score_bos, skip_empty=skip_empty,
                                max_sequences=max_sequences)
    result = evaluate_sequences(model, sequences, batch_size=batch_size, num_time_draws=num_time_draws,
                                num_steps=num_steps, seed=seed, device=device, autocast_dtype=autocast_dtype,
                                progress=progress)
    if convention == "concat":
        scored = ("every token of each block: the rows' tokens and the end-of-text after each row"
                  + ("" if drop_last else "; the EOT padding of the last block is not scored"))
    else:
        scored = ("each row's tokens and its closing end-of-text"
                  + ("" if not score_bos else ", and the leading end-of-text")
                  + "; not the EOT padding" + ("" if score_bos else " nor the leading end-of-text")
                  + "; rows over seq_len-2 tokens are cut to seq_len-1 tokens, all scored")
    result.update(
        dataset=spec.key,
        title=spec.title,
        source=source,
        split=source["split"],
        convention=convention,
        detokenizer=spec.detokenizer,
        scored=scored,
        drop_last=drop_last,
        score_bos=score_bos,
        skip_empty=skip_empty,
        n_rows=len(rows),
        n_documents=sequences.n_documents,
        n_truncated=sequences.n_truncated,
        n_unscored_tail=sequences.n_unscored_tail,
        max_sequences=max_sequences,
        seconds=time.perf_counter() - t0,
    )
    return result


# ----------------------------------------------------------------------------------------------
# Command line


def format_zeroshot_table(results: Sequence[dict[str, Any]], *, header: str | None = None) -> str:
    """Markdown table of zero-shot results (one row per data set)."""
    lines = [header, ""] if header else []
    lines += [
        "| data set | split | convention | sequences | scored tokens | nats/token | ± stderr "
        "| perplexity bound | 95% CI |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lo, hi = r["perplexity_ci95"]
        lines.append(
            f"| {r['title']} | {r['split']} | {r['convention']} | {r['n_sequences']} | {r['n_scored_tokens']} "
            f"| {r['nats_per_token']:.4f} | {r['stderr_nats']:.4f} | {r['perplexity']:.2f} | [{lo:.2f}, {hi:.2f}] |"
        )
    return "\n".join(lines)


def run_zeroshot(
    run_dir: str | os.PathLike[str],
    datasets: Sequence[str],
    *,
    paths: dict[str, str] | None = None,
    convention: str = "concat",
    split: str | None = None,
    draws: int = 1,
    steps: int | None = None,
    max_sequences: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    weights: str = "ema",
    score_bos: bool = False,
    skip_empty: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a run folder on several data sets; merge the results into ``RUN_DIR/zeroshot.json``.

    Results are stored under ``"<dataset>/<convention>/<split>"``, so runs on other data sets or
    conventions add to the file instead of replacing it.
    """
    specs = [get_dataset(d) for d in datasets]
    if not specs:
        raise ValueError("no data sets given: --datasets lambada,wikitext2,wikitext103,ptb,lm1b")
    paths = {get_dataset(k).key: v for k, v in (paths or {}).items()}
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run = runs.load(run_dir, weights=weights, device=device)
    check_gpt2_model(run.model)
    autocast = torch.bfloat16 if str(device).startswith("cuda") else None
    results = []
    for spec in specs:
        r = zeroshot_perplexity(
            run.model, spec.key, convention=convention, path=paths.get(spec.key), split=split,
            batch_size=batch_size, num_time_draws=draws, num_steps=steps, seed=seed, max_sequences=max_sequences,
            device=device, autocast_dtype=autocast, progress=progress, score_bos=score_bos, skip_empty=skip_empty,
        )
        r.update(run=str(run_dir), step=run.step, weights=run.weights, method=run.config.diffusion.method)
        results.append(r)
    out = Path(run_dir) / "zeroshot.json"
    stored: dict[str, Any] = {}
    if out.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            stored = json.loads(out.read_text()).get("results", {})
    for r in results:
        stored[f"{r['dataset']}/{r['convention']}/{r['split']}"] = r
    write_json_atomic(out, {"run": str(run_dir), "results": stored})
    return {"run": str(run_dir), "step": run.step, "weights": run.weights, "results": results, "file": str(out)}
