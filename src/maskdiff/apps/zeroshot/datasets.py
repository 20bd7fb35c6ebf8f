"""The zero-shot data sets: where each lives on the Hub, its text column and its detokeniser.

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

Detokenisers (:func:`detokenize_wikitext`, :func:`detokenize_ptb`, :func:`detokenize_lm1b`,
:func:`detokenize_lambada`) undo the data sets' tokenisation before GPT-2 BPE, with the
behaviour of ``wt_detokenizer``, ``ptb_detokenizer``, ``lm1b_detokenizer`` and
``lambada_detokenizer`` in SEDD's ``data.py`` and MDLM's ``dataloader.py`` (the two are identical;
the WikiText one descends from Megatron-LM's zero-shot GPT-2 evaluation, the LAMBADA one is
OpenAI's, quoted in openai/gpt-2 issue #131). They are applied to each row of the data set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = [
    "ZeroShotDataset",
    "DATASETS",
    "get_dataset",
    "detokenize_wikitext",
    "detokenize_ptb",
    "detokenize_lm1b",
    "detokenize_lambada",
    "DETOKENIZERS",
]

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
