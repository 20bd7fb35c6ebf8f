"""Generative perplexity and unigram entropy of texts, of a run's samples and of its data.

The statistics half of the app: scoring texts with a loaded :class:`~maskdiff.apps.genppl.scorers.Scorer`,
the samples' entropy, the result dicts, the Markdown table and the body of ``maskdiff genppl``.

Which tokens are scored
-----------------------
Texts are re-tokenised with the scorer's tokenizer (no special tokens added by the tokenizer).
Each text is then preceded by the scorer's *document-start* token — ``<|endoftext|>``, the
document separator both GPT-2 and SmolLM2 were pre-trained with (for SmolLM2 this is not the
GGUF's declared BOS ``<|im_start|>``, which opens a chat turn; with it, perplexity on a
Wikipedia sentence roughly doubles) — and **every token of the text** is scored, each
conditioned on the document-start token and the text before it. The document-start token
itself is not scored. A scorer without such a token would score all tokens after the first.
Texts longer than ``max_length`` scorer tokens are truncated (and counted).

(The MDLM/Duo reference code prepends nothing and scores all tokens after the first; that
differs from this by the first token of each text only.)

Statistics
----------
Per text i: S_i = total NLL in nats, n_i = scored tokens. The reported mean NLL per token is
the token-weighted R = Σ S_i / Σ n_i and gen PPL = exp(R), as in the literature. Texts are the
independent units (tokens within one text are not independent), so the standard error of R is
the ratio-estimator one (:func:`maskdiff.metrics.ratio_estimate`; docs/math.md, "Token-weighted
averages: the ratio estimator"), se = sqrt(Σ (S_i - R n_i)² / (N (N-1))) / mean(n_i); the 95%
interval R ± Z95 se (:data:`maskdiff.metrics.Z95` ≈ 1.96) is mapped through exp to an interval
for gen PPL.

Gen PPL is per *scorer token*, so it also moves with how many tokens the scorer splits a text
into: pseudo-words cut into few long-shot tokens can score a worse gen PPL than letter soup cut
into many cheap ones, while being better per character. The same NLL per character of text
(``bits_per_char``, Σ S_i / Σ chars_i / ln 2, with the same ratio standard error) is comparable
between sample sets of one text length, and is reported next to it.

Unigram entropy (:func:`unigram_entropy`): for each sample, the entropy of the empirical
distribution of its own tokens, averaged over samples (the diffusion-LM convention, e.g. the
Duo/MDLM code, which uses natural logs: ``per_sample_nats``), and the entropy of the pooled
counts of all samples together (``corpus_bits``). Reported in bits per token; "token" is the
unit of the sequence given (characters for a character model).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from maskdiff import runs
from maskdiff.apps.checks import WorkFailed, check_run_writable, settings_suffix
from maskdiff.apps.generate import generate_tokens
from maskdiff.apps.genppl.scorers import Scorer, load_scorer
from maskdiff.build import run_data
from maskdiff.data import CHAR_CORPORA
from maskdiff.devices import resolve_device
from maskdiff.fileio import write_json_atomic
from maskdiff.metrics import LN2, ratio_estimate

__all__ = [
    "generative_perplexity",
    "unigram_entropy",
    "sample_quality",
    "reference_quality",
    "format_quality_table",
    "run_genppl",
]


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _scorer_inputs(texts: Sequence[str], scorer: Scorer, max_length: int) -> tuple[list[list[int]], list[int], int]:
    """Each text as scorer token ids, cut to ``max_length`` and preceded by the document-start
    token when the scorer has one; the characters of text its scored tokens cover; and the
    number of texts cut."""
    has_prefix = scorer.prefix_token_id is not None
    tok = scorer.tokenizer
    seqs: list[list[int]] = []
    chars: list[int] = []  # characters covered by the scored tokens of each text
    n_truncated = 0
    for text in texts:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        cut = len(ids) > max_length
        if cut:
            ids = ids[:max_length]
            n_truncated += 1
        seqs.append(([scorer.prefix_token_id] if has_prefix else []) + ids)
        whole = has_prefix and not cut
        chars.append(len(text) if whole else len(tok.decode(ids if has_prefix else ids[1:])))
    return seqs, chars, n_truncated


@torch.no_grad()
def _sequence_nlls(seqs: list[list[int]], scorer: Scorer, batch_size: int) -> np.ndarray:
    """Total NLL in nats of positions 1, 2, … of each sequence under the scorer (0 where there
    is nothing to score), in padded batches of ``batch_size`` sequences of similar length."""
    tok = scorer.tokenizer
    scored = [len(s) - 1 for s in seqs]  # targets are positions 1..len-1
    sums = np.zeros(len(seqs), dtype=np.float64)
    order = sorted((i for i in range(len(seqs)) if scored[i] > 0), key=lambda i: len(seqs[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (scorer.prefix_token_id or 0)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        ids, mask = ids.to(scorer.device), mask.to(scorer.device)
        logits = scorer.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        nll = (nll.double() * mask[:, 1:]).sum(1).cpu().numpy()
        sums[rows] = nll
    return sums


@torch.no_grad()
def generative_perplexity(
    texts: Sequence[str],
    scorer: Scorer,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Perplexity of ``texts`` under ``scorer`` (token-weighted), with a 95% interval over texts.

    Each text is re-tokenised with the scorer's tokenizer, preceded by the scorer's document-
    start token (``scorer.prefix_token``), and every one of its tokens is scored (see the
    module docstring); at most ``max_length`` tokens per text (default: the scorer's context
    minus the prefix) — longer texts are truncated and counted in ``n_truncated``. Texts with
    nothing to score (empty) are left out and counted in ``n_empty``.

    Returns a dict: ``gen_ppl`` = exp(nll), ``gen_ppl_ci95``, ``nll`` (nats per scorer token,
    Σ NLL / Σ tokens), ``nll_stderr``, ``nll_ci95``, ``bits_per_scorer_token``,
    ``bits_per_char`` and its ``bits_per_char_stderr`` (the same NLL per character of the
    scored text, in bits: comparable across sample sets that the scorer tokenises into
    different numbers of tokens, which gen PPL per token is not), ``n_chars``, ``n_texts``
    (scored), ``n_tokens``, ``tokens_per_text``, ``per_text_nll`` (nats per token of each text,
    None for empty ones), ``per_text_tokens``, ``n_truncated``, ``n_empty``, ``scorer``
    (label), ``prefix_token``, ``max_length``.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    has_prefix = scorer.prefix_token_id is not None
    limit = scorer.max_context - (1 if has_prefix else 0)
    if max_length is None:
        max_length = limit
    if max_length < 1:
        raise ValueError(f"max_length must be ≥ 1, got {max_length}")
    max_length = min(max_length, limit)

    seqs, chars, n_truncated = _scorer_inputs(texts, scorer, max_length)
    sums = _sequence_nlls(seqs, scorer, batch_size)
    scored = [len(s) - 1 for s in seqs]
    valid = np.array([c > 0 for c in scored], dtype=bool)
    counts = np.array(scored, dtype=np.float64)
    if not valid.any():
        raise ValueError("no text has any token to score (all texts are empty)")
    per_token = ratio_estimate(torch.from_numpy(sums[valid]), torch.from_numpy(counts[valid]))
    r, se = per_token.mean, per_token.stderr
    lo, hi = per_token.ci95
    nchar = np.array(chars, dtype=np.float64)
    rc, sec = float("nan"), float("nan")
    if nchar[valid].sum() > 0:
        per_char = ratio_estimate(torch.from_numpy(sums[valid]), torch.from_numpy(nchar[valid]))
        rc, sec = per_char.mean, per_char.stderr
    return {
        "scorer": scorer.label,
        "gen_ppl": math.exp(r),
        "gen_ppl_ci95": [math.exp(lo), math.exp(hi) if math.isfinite(hi) else float("inf")],
        "nll": r,
        "nll_stderr": se,
        "nll_ci95": [lo, hi],
        "bits_per_scorer_token": r / LN2,
        # The same NLL per character of text: comparable between sample sets that the scorer
        # splits into different numbers of tokens (gen PPL per token is not).
        "bits_per_char": rc / LN2,
        "bits_per_char_stderr": sec / LN2,
        "n_chars": int(nchar[valid].sum()),
        "n_texts": int(valid.sum()),
        "n_tokens": int(counts[valid].sum()),
        "tokens_per_text": float(counts[valid].mean()),
        "per_text_nll": [float(s / c) if c > 0 else None for s, c in zip(sums, counts)],
        "per_text_tokens": [int(c) for c in counts],
        "n_truncated": n_truncated,
        "n_empty": int((~valid).sum()),
        "prefix_token": scorer.prefix_token,
        "max_length": max_length,
        "scored_tokens": (f"every token of each text, after the prefix {scorer.prefix_token}" if has_prefix
                          else "every token of each text after its first"),
    }


# --------------------------------------------------------------------------------------------
# Unigram entropy
# --------------------------------------------------------------------------------------------


def _as_sequences(samples: Any) -> list[Sequence[Any]]:
    if isinstance(samples, str):
        raise TypeError("pass a list of texts (or of token-id sequences), not one string")
    if isinstance(samples, Tensor):
        if samples.dim() != 2:
            raise ValueError(f"a tensor of samples must be 2-D (num, length), got shape {tuple(samples.shape)}")
        return [row.tolist() for row in samples.cpu()]
    if isinstance(samples, np.ndarray):
        if samples.ndim != 2:
            raise ValueError(f"an array of samples must be 2-D (num, length), got shape {samples.shape}")
        return [row.tolist() for row in samples]
    out = []
    for s in samples:
        if isinstance(s, str):
            out.append(s)  # characters are the symbols
        elif isinstance(s, (Tensor, np.ndarray)):
            out.append(np.asarray(s.cpu() if isinstance(s, Tensor) else s).ravel().tolist())
        else:
            out.append(list(s))
    return out


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no -0.0


def unigram_entropy(samples: Any, *, unit: str = "token") -> dict[str, Any]:
    """Unigram entropy of samples, in bits per ``unit``.

    ``samples``: a 2-D tensor/array of token ids (one row per sample), a list of id sequences,
    or a list of strings (each character is a symbol). Returns ``per_sample_bits`` (mean over
    samples of the entropy of each sample's own token distribution — the diffusion-LM
    convention), ``per_sample_bits_stderr``, ``per_sample_nats`` (the same in nats, as the
    MDLM/Duo code reports it), ``corpus_bits`` (entropy of all samples' tokens pooled),
    ``distinct`` (symbols seen), ``n_samples``, ``n_tokens`` and ``unit``. Empty samples are
    skipped. For a fixed length L the per-sample entropy is at most log2 L, so compare it only
    between samples of equal length.
    """
    seqs = [s for s in _as_sequences(samples) if len(s) > 0]
    if not seqs:
        raise ValueError("no non-empty sample to compute an entropy from")
    per = np.array([_entropy_bits(np.array(list(Counter(s).values()), dtype=np.float64)) for s in seqs])
    pooled: Counter = Counter()
    for s in seqs:
        pooled.update(s)
    n = len(per)
    return {
        "per_sample_bits": float(per.mean()),
        "per_sample_bits_stderr": float(per.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf"),
        "per_sample_nats": float(per.mean() * LN2),
        "corpus_bits": _entropy_bits(np.array(list(pooled.values()), dtype=np.float64)),
        "distinct": len(pooled),
        "n_samples": n,
        "n_tokens": int(sum(len(s) for s in seqs)),
        "unit": unit,
    }


# --------------------------------------------------------------------------------------------
# Samples from a run, scored
# --------------------------------------------------------------------------------------------


def _model_unit(run: Any) -> str:
    return "character" if run.config.data.corpus in CHAR_CORPORA else "GPT-2 token"


def _load_run(run_dir_or_run: Any, device: torch.device) -> Any:
    if isinstance(run_dir_or_run, runs.LoadedRun):
        return run_dir_or_run
    return runs.load(run_dir_or_run, device=str(device))


def _get_scorer(scorer: Scorer | str, device: str | torch.device | None) -> Scorer:
    return scorer if isinstance(scorer, Scorer) else load_scorer(scorer, device)


def sample_quality(
    run: Any,
    *,
    num: int = 32,
    steps: int = 256,
    precision: str = "float64",
    seed: int = 0,
    scorer: Scorer | str = "auto",
    length: int | None = None,
    grid: str = "cosine",
    sampler: str = "ancestral",
    top_p: float | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    cache: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str = "auto",
    scorer_device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Draw ``num`` unconditional samples from a run and report their quality.

    ``run``: a run folder or a :class:`~maskdiff.runs.LoadedRun`. Sampling is the same call
    as ``maskdiff sample`` (:func:`maskdiff.apps.generate.generate_tokens`, float32 network)
    with the same seed, so the texts are identical to what that command prints; the token ids
    are kept for the entropy.
    ``scorer``: a :class:`Scorer` or a name for :func:`load_scorer` (loaded on
    ``scorer_device``, default the sampling device).

    Returns a dict with ``gen_ppl``, ``gen_ppl_ci95``, ``nll`` (nats per scorer token) and
    ``nll_stderr``; ``entropy`` (``unigram_entropy`` of the samples in the model's own tokens)
    and ``scorer_token_entropy`` (in the scorer's tokens); the headline entropies
    ``entropy_per_sample_bits`` and ``entropy_corpus_bits``; ``sampler`` (all sampler
    settings), ``precision``, ``scorer`` (label), ``num_samples``, ``run``/``step``/``weights``,
    timings, and the sample ``texts``.
    """
    dev = resolve_device(device)
    loaded = _load_run(run, dev)
    sc = _get_scorer(scorer, scorer_device or dev)
    # The call behind `maskdiff sample` (same seed, same texts), keeping the token ids.
    t0 = time.perf_counter()
    with torch.no_grad():
        tokens, settings, _ = generate_tokens(
            loaded, num=num, length=length, steps=steps, grid=grid, sampler=sampler, top_p=top_p, top_k=top_k,
            temperature=temperature, precision=precision, seed=seed, cache=cache, device=dev, progress=progress,
            compute="fp32",
        )
    tok, cfg = loaded.tokenizer, loaded.config
    length = tokens.shape[1]
    texts = [tok.decode(row.tolist()) for row in tokens]
    t_sample = time.perf_counter() - t0

    t0 = time.perf_counter()
    ppl = generative_perplexity(texts, sc, batch_size=batch_size, max_length=max_length)
    t_score = time.perf_counter() - t0
    ent = unigram_entropy(tokens, unit=_model_unit(loaded))
    scorer_ids = [sc.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ent_scorer = (unigram_entropy(scorer_ids, unit=f"{sc.name} token") if any(scorer_ids) else None)
    return {
        "scorer": sc.label,
        "scorer_name": sc.name,
        "precision": precision,
        "num_samples": num,
        "gen_ppl": ppl["gen_ppl"],
        "gen_ppl_ci95": ppl["gen_ppl_ci95"],
        "nll": ppl["nll"],
        "nll_stderr": ppl["nll_stderr"],
        "scorer_bits_per_char": ppl["bits_per_char"],
        "scorer_bits_per_char_stderr": ppl["bits_per_char_stderr"],
        "entropy_per_sample_bits": ent["per_sample_bits"],
        "entropy_per_sample_bits_stderr": ent["per_sample_bits_stderr"],
        "entropy_corpus_bits": ent["corpus_bits"],
        "entropy_unit": ent["unit"],
        "entropy": ent,
        "scorer_token_entropy": ent_scorer,
        "sampler": dict(steps=steps, grid=grid, sampler=sampler, top_p=top_p, top_k=top_k, temperature=temperature,
                        seed=seed, length=length, num=num, cache=settings["cache"], precision=precision),
        "scoring": {k: ppl[k] for k in ("n_texts", "n_tokens", "tokens_per_text", "n_truncated", "n_empty",
                                        "prefix_token", "max_length", "scored_tokens", "per_text_nll")},
        "run": str(loaded.path),
        "step": loaded.step,
        "weights": loaded.weights,
        "corpus": cfg.data.corpus,
        "seconds": {"sampling": t_sample, "scoring": t_score, "scorer_load": sc.load_seconds},
        "texts": texts,
    }


def reference_quality(
    run: Any,
    *,
    num: int = 32,
    scorer: Scorer | str = "auto",
    split: str = "test",
    length: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """The same measures on real data: ``num`` evenly spaced chunks of ``length`` tokens from the
    run's ``split`` (default the test split), decoded and scored like samples. A calibration
    row: it shows what the scorer makes of real text in this corpus's format (for
    character-level text8-style data: lower case, no punctuation)."""
    dev = resolve_device(device)
    loaded = _load_run(run, dev)
    cfg, tok = loaded.config, loaded.tokenizer
    length = length or cfg.data.seq_len
    data = np.asarray(run_data(cfg, loaded.path).split(split))
    chunks = len(data) // length
    if chunks < 1:
        raise ValueError(f"the {split} split has fewer than {length} tokens")
    starts = (np.linspace(0, chunks - 1, num=min(num, chunks)).round().astype(np.int64)) * length
    rows = np.stack([data[s : s + length] for s in starts]).astype(np.int64)
    texts = [tok.decode(r.tolist()) for r in rows]
    sc = _get_scorer(scorer, dev)
    ppl = generative_perplexity(texts, sc, batch_size=batch_size, max_length=max_length)
    ent = unigram_entropy(rows, unit=_model_unit(loaded))
    return {
        "scorer": sc.label, "scorer_name": sc.name, "precision": f"data ({split})", "num_samples": len(texts),
        "gen_ppl": ppl["gen_ppl"], "gen_ppl_ci95": ppl["gen_ppl_ci95"], "nll": ppl["nll"],
        "nll_stderr": ppl["nll_stderr"], "scorer_bits_per_char": ppl["bits_per_char"],
        "scorer_bits_per_char_stderr": ppl["bits_per_char_stderr"], "entropy_per_sample_bits": ent["per_sample_bits"],
        "entropy_per_sample_bits_stderr": ent["per_sample_bits_stderr"], "entropy_corpus_bits": ent["corpus_bits"],
        "entropy_unit": ent["unit"], "entropy": ent,
        "sampler": {"length": length, "split": split, "chunks": "evenly spaced"},
        "scoring": {k: ppl[k] for k in ("n_texts", "n_tokens", "tokens_per_text", "n_truncated", "n_empty",
                                        "prefix_token", "max_length", "scored_tokens")},
        "run": str(loaded.path), "corpus": cfg.data.corpus, "texts": texts,
    }


def format_quality_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`sample_quality` / :func:`reference_quality` results; the
    scoring model is named in the title and in every row."""
    if not results:
        return ""
    labels = sorted({r["scorer"] for r in results})
    unit = results[0].get("entropy_unit", "token")
    head = [
        f"generative perplexity under {' / '.join(labels)}; entropy in bits per {unit}",
        "",
        f"| precision | samples | steps | top-p | gen PPL | 95% CI | scorer bits/char ± se "
        f"| entropy/sample (bits/{unit}) ± se | corpus entropy (bits/{unit}) | scorer tokens/sample | scorer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for r in results:
        s = r.get("sampler", {})
        lo, hi = r["gen_ppl_ci95"]
        rows.append(
            f"| {r['precision']} | {r['num_samples']} | {s.get('steps', '—')} | {s.get('top_p') or '—'} "
            f"| {r['gen_ppl']:.1f} | [{lo:.1f}, {hi:.1f}] "
            f"| {r['scorer_bits_per_char']:.3f} ± {r['scorer_bits_per_char_stderr']:.3f} "
            f"| {r['entropy_per_sample_bits']:.3f} ± {r['entropy_per_sample_bits_stderr']:.3f} "
            f"| {r['entropy_corpus_bits']:.3f} | {r['scoring']['tokens_per_text']:.1f} | {r['scorer']} |"
        )
    return "\n".join(head + rows)


# --------------------------------------------------------------------------------------------
# The body of `maskdiff genppl RUN_DIR`
# --------------------------------------------------------------------------------------------


def _check_finite(result: dict[str, Any], out: Path) -> None:
    """A NaN generative perplexity is a failure of the work: nothing replaces ``out``."""
    if not math.isfinite(float(result["gen_ppl"])):
        raise WorkFailed(f"generative perplexity came out {result['gen_ppl']}; nothing was written ({out} is unchanged)")


def run_genppl(run_dir: str | os.PathLike[str], *, precision: str = "float64", scorer: str = "auto",
               reference: bool = False, num: int = 32, steps: int = 256, seed: int = 0, length: int | None = None,
               grid: str = "cosine", top_p: float | None = None, top_k: int | None = None,
               temperature: float = 1.0, batch_size: int = 8, device: str = "auto") -> list[dict[str, Any]]:
    """``maskdiff genppl``: sample quality for each precision (``"both"``: float64 and float32, same
    seed) written to ``RUN_DIR/genppl-<precision>.json``, plus the real-data row
    (``genppl-data.json``) with ``reference``. Settings other than the defaults are named in the
    file name (``genppl-float64-n8-T64.json``), so results of other settings never replace each
    other; a NaN result writes nothing. Returns the results in that order."""
    check_run_writable(run_dir, "genppl", "it keeps its results in RUN_DIR/genppl-*.json: copy the run folder "
                       "and score the copy")
    dev = resolve_device(device)
    run = _load_run(run_dir, dev)
    sc = load_scorer(scorer, dev)
    precisions = ["float64", "float32"] if precision == "both" else [precision]
    # Results of other settings get their own file; the default settings keep genppl-<precision>.json.
    suffix = settings_suffix([("n", num, 32), ("T", steps, 256), ("seed", seed, 0), ("L", length, None),
                              ("grid-", grid, "cosine"), ("p", top_p, None), ("k", top_k, None),
                              ("temp", temperature, 1.0), ("scorer-", scorer, "auto")])
    data_suffix = settings_suffix([("n", num, 32), ("L", length, None), ("scorer-", scorer, "auto")])
    results = []
    for prec in precisions:
        res = sample_quality(run, num=num, steps=steps, precision=prec, seed=seed, scorer=sc, length=length,
                             grid=grid, top_p=top_p, top_k=top_k, temperature=temperature, batch_size=batch_size,
                             device=str(dev))
        out = Path(run_dir) / f"genppl-{prec}{suffix}.json"
        _check_finite(res, out)
        write_json_atomic(out, res)
        print(f"wrote {out}", file=sys.stderr)
        results.append(res)
    if reference:
        ref = reference_quality(run, num=num, scorer=sc, length=length, batch_size=batch_size, device=str(dev))
        out = Path(run_dir) / f"genppl-data{data_suffix}.json"
        _check_finite(ref, out)
        write_json_atomic(out, ref)
        results.append(ref)
    return results
