"""Local lm-evaluation-harness tasks from the held-out Wikipedia test split (wiki-char), deterministic.

Writes into OUT (task YAML files with absolute paths to their JSONL data; pass OUT as
``maskdiff lm-eval --include-path OUT``):

* ``wiki_cloze`` (multiple choice): from each of ITEMS test-split articles, chosen in a seeded
  random order, one item: a word position i drawn uniformly among those with at least 64 characters
  of the article before it; the context is the article's text before word i, cut to its last
  ``--context-chars`` characters at a word start; the true continuation is " " + words i and i+1;
  three distractors are two-word spans (" w1 w2") of *other* test-split articles with exactly the
  same number of characters (so the choices' lengths carry no signal), drawn uniformly without
  replacement; the four choices are shuffled. Only articles that lie wholly in the test split are
  used, for contexts and distractors alike.
* ``wiki_rolling`` (``loglikelihood_rolling``, word/byte perplexity): the first DOCS pieces of
  ``--doc-chars`` characters of the test split, in order. With ``--doc-chars`` a multiple of the
  model's length (128 for the demo), the harness's rolling windows are exactly the chunks that
  ``maskdiff eval RUN --split test --max-chunks DOCS*doc_chars/128`` scores.

Articles are located in the normalised stream as ``maskdiff.data.wiki`` builds it (extracts in
file order joined by one space, text8 rules, split 90/5/5). Everything depends only on the
bundled corpus file and ``--seed``.

    python bench/build_cloze.py --out runs/lmeval/tasks --items 300 --docs 40
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from maskdiff.data.splits import split_90_5_5
from maskdiff.data.tokenizers import normalize_text8
from maskdiff.data.wiki import read_wiki_extracts

MC_YAML = """task: wiki_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

ROLLING_YAML = """task: wiki_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def test_articles(min_chars: int = 200) -> tuple[str, int, list[str]]:
    """(the normalised stream, where its test split starts, the texts of the articles wholly inside it)."""
    extracts = read_wiki_extracts()
    stream = normalize_text8(" ".join(extracts))
    _, test_start = split_90_5_5(len(stream))
    articles, pos = [], 0
    for extract in extracts:
        text = normalize_text8(extract).strip()
        if not text:
            continue
        at = stream.find(text, pos)
        if at < 0:
            raise RuntimeError("an article was not found in the normalised stream: the corpus recipe changed")
        pos = at + len(text)
        if at >= test_start and len(text) >= min_chars:
            articles.append(text)
    return stream, test_start, articles


def cloze_items(articles: list[str], n_items: int, seed: int, context_chars: int) -> list[dict]:
    """One multiple-choice item per article (see the module docs), at most ``n_items``."""
    rng = np.random.default_rng(seed)
    spans: dict[int, list[tuple[int, str]]] = defaultdict(list)  # length -> (article, " w1 w2")
    for a, text in enumerate(articles):
        words = text.split(" ")
        for i in range(len(words) - 1):
            span = f" {words[i]} {words[i + 1]}"
            spans[len(span)].append((a, span))
    items = []
    for a in rng.permutation(len(articles)).tolist():
        words = articles[a].split(" ")
        starts = np.cumsum([0] + [len(w) + 1 for w in words])  # character offset of each word
        candidates = [i for i in range(1, len(words) - 1) if starts[i] - 1 >= 64]
        if not candidates:
            continue
        i = int(rng.choice(candidates))
        before = " ".join(words[:i])
        cut = max(0, len(before) - context_chars)
        if cut > 0:
            cut = before.index(" ", cut) + 1  # start at a word
        answer = f" {words[i]} {words[i + 1]}"
        pool = sorted({s for b, s in spans[len(answer)] if b != a and s != answer})
        if len(pool) < 3:
            continue
        picks = rng.choice(len(pool), size=3, replace=False)
        choices = [answer] + [pool[k] for k in picks]
        order = rng.permutation(4).tolist()
        items.append({"context": before[cut:], "choices": [choices[k] for k in order], "label": order.index(0),
                      "article": a})
        if len(items) == n_items:
            break
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the task YAML and JSONL files")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--doc-chars", type=int, default=1280)
    parser.add_argument("--context-chars", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("wiki_cloze.jsonl", "wiki_rolling.jsonl", "wiki_cloze.yaml", "wiki_rolling.yaml"):
        if (out / name).exists():
            raise SystemExit(f"{out / name} exists; choose another --out (files are never replaced)")
    stream, test_start, articles = test_articles()
    items = cloze_items(articles, args.items, args.seed, args.context_chars)
    test = stream[test_start:]
    docs = [test[k * args.doc_chars:(k + 1) * args.doc_chars] for k in range(args.docs)]
    if len(docs[-1]) < args.doc_chars:
        raise SystemExit(f"the test split holds {len(test)} characters, fewer than {args.docs} × {args.doc_chars}")
    (out / "wiki_cloze.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (out / "wiki_rolling.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (out / "wiki_cloze.yaml").write_text(MC_YAML.format(data=out / "wiki_cloze.jsonl"))
    (out / "wiki_rolling.yaml").write_text(ROLLING_YAML.format(data=out / "wiki_rolling.jsonl"))
    print(f"{len(items)} cloze items from {len(articles)} test-split articles, {len(docs)} rolling documents of "
          f"{args.doc_chars} characters: {out}")


if __name__ == "__main__":
    main()
