"""Zero-shot perplexity of a model: evaluation sequences through the one evaluation loop.

Estimates (:func:`zeroshot_perplexity`): the sequences and their score masks go through
:func:`maskdiff.evaluate.evaluate_batches`, the loop behind :func:`~maskdiff.evaluate.evaluate_nelbo`,
with the same per-batch seeding. Each sequence's NELBO is estimated with ``num_time_draws``
time/mask draws (continuous time, or discrete time with ``num_steps``). Nats per token are
``Σ_i y_i / Σ_i n_i`` over sequences i (y_i the mean NELBO of the draws, n_i its scored tokens),
the literature's token-weighted average. Its standard error is the ratio estimator's,
``sqrt(Σ_i (y_i - R n_i)² / (N (N-1))) / mean(n)`` (for ``concat`` with every n_i = seq_len this is
:func:`~maskdiff.evaluate.evaluate_nelbo`'s), covering Monte Carlo noise and the variation between
sequences (docs/math.md, "Token-weighted averages: the ratio estimator"). ``perplexity`` =
exp(nats per token), an upper bound (up to that error) on the model's perplexity, and its interval
is ``exp`` of the nats interval. The continuous-time estimate is heavy-tailed (the weight
w(t) ≈ 1/t meets rare masks at small t), so with few sequences the sample standard error tends to
be too small; use several draws.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskdiff import runs
from maskdiff.apps.checks import WorkFailed, check_run_writable, settings_suffix
from maskdiff.apps.zeroshot.datasets import get_dataset
from maskdiff.apps.zeroshot.rows import load_rows
from maskdiff.apps.zeroshot.sequences import CONVENTIONS, ZeroShotSequences, build_sequences
from maskdiff.data.tokenizers import GPT2_VOCAB_SIZE
from maskdiff.devices import resolve_device
from maskdiff.evaluate import evaluate_batches
from maskdiff.fileio import write_json_atomic

__all__ = ["check_gpt2_model", "evaluate_sequences", "zeroshot_perplexity", "format_zeroshot_table", "run_zeroshot"]


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


def _sequence_batches(sequences: ZeroShotSequences, batch_size: int) -> Iterator[tuple[Tensor, None, Tensor]]:
    """``(x, labels, score_mask)`` batches of ``sequences``, in order."""
    for start in range(0, len(sequences), batch_size):
        x = torch.from_numpy(sequences.tokens[start : start + batch_size].astype(np.int64))
        yield x, None, torch.from_numpy(sequences.score_mask[start : start + batch_size])


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

    :func:`maskdiff.evaluate.evaluate_batches` with the sequences' score masks: batches whose
    every position is scored call ``model(x, generator=, num_steps=)`` exactly as
    :func:`~maskdiff.evaluate.evaluate_nelbo` does (same seeding, so ``concat`` blocks give the
    same numbers); others pass ``score_mask=`` (a :class:`maskdiff.model.MaskedDiffusion`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return evaluate_batches(
        model, _sequence_batches(sequences, batch_size), seq_len=sequences.seq_len,
        num_batches=math.ceil(len(sequences) / batch_size), num_time_draws=num_time_draws, num_steps=num_steps,
        seed=seed, device=device, autocast_dtype=autocast_dtype, progress=progress, desc="zero-shot",
    )


def _scored_description(convention: str, *, drop_last: bool, score_bos: bool) -> str:
    """Which tokens count, in words (stored with each result)."""
    if convention == "concat":
        return ("every token of each block: the rows' tokens and the end-of-text after each row"
                + ("" if drop_last else "; the EOT padding of the last block is not scored"))
    return ("each row's tokens and its closing end-of-text"
            + ("" if not score_bos else ", and the leading end-of-text")
            + "; not the EOT padding" + ("" if score_bos else " nor the leading end-of-text")
            + "; rows over seq_len-2 tokens are cut to seq_len-1 tokens, all scored")


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
    result.update(
        dataset=spec.key,
        title=spec.title,
        source=source,
        split=source["split"],
        convention=convention,
        detokenizer=spec.detokenizer,
        scored=_scored_description(convention, drop_last=drop_last, score_bos=score_bos),
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
# Tables and run folders


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
    check_run_writable(run_dir, "zeroshot", "it keeps its results in RUN_DIR/zeroshot.json: copy the run folder "
                       "and evaluate the copy")
    specs = [get_dataset(d) for d in datasets]
    if not specs:
        raise ValueError("no data sets given: --datasets lambada,wikitext2,wikitext103,ptb,lm1b")
    paths = {get_dataset(k).key: v for k, v in (paths or {}).items()}
    device = resolve_device(device)
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
    # Results of other settings get their own key; the default settings keep "<dataset>/<convention>/<split>".
    suffix = settings_suffix([("K", draws, 1), ("T", steps, None), ("n", max_sequences, None), ("seed", seed, 0),
                              ("raw", weights == "raw", False), ("bos", score_bos, False),
                              ("skip-empty", skip_empty, False)])
    for r in results:
        if not math.isfinite(float(r["nats_per_token"])):
            raise WorkFailed(f"zero-shot evaluation of {r['dataset']} gave {r['nats_per_token']} nats per token; "
                             f"nothing was written ({out} is unchanged)")
        stored[f"{r['dataset']}/{r['convention']}/{r['split']}{suffix}"] = r
    write_json_atomic(out, {"run": str(run_dir), "results": stored})
    return {"run": str(run_dir), "step": run.step, "weights": run.weights, "results": results, "file": str(out)}
