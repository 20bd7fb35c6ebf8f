"""A run's likelihood on a data split: the negative ELBO with error bars, written to a result file.

:func:`run_eval` is what ``maskdiff eval`` runs; :func:`eval_file_name` is the one naming rule for
its result files (so results of other settings never replace each other);
:func:`format_eval_table` prints one.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from maskdiff import runs
from maskdiff.build import run_data
from maskdiff.checkpoint import latest_checkpoint
from maskdiff.devices import resolve_device
from maskdiff.evaluate import evaluate_split
from maskdiff.fileio import read_json, write_json_atomic

__all__ = ["eval_file_name", "run_eval", "format_eval_table", "elbo_vs_steps"]

# Where elbo_vs_steps keeps evaluations that must not replace the run's own eval files.
ELBO_CACHE = Path("plots") / "cache"


def eval_file_name(split: str, *, steps: int | None = None, seed: int = 0, draws: int = 1) -> str:
    """``eval-<split>[-T<T>][-seed<S>][-K<K>].json``: results of other settings never replace the
    default ``eval-<split>.json``."""
    suffix = (f"-T{steps}" if steps else "") + (f"-seed{seed}" if seed else "") + (f"-K{draws}" if draws > 1 else "")
    return f"eval-{split}{suffix}.json"


def run_eval(run_dir: str | os.PathLike, *, split: str, draws: int = 1, steps: int | None = None, seed: int = 0,
             batch_size: int = 64, max_chunks: int | None = None, device: str = "auto",
             weights: str = "ema", progress: bool = True, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate a run on a split and write the result as JSON to ``out`` (default
    ``RUN_DIR/<eval_file_name(...)>``). Returns the result: bits per token with stderr and 95%
    interval, the unigram (text) or histogram (images) baseline of the same split, the settings."""
    dev = resolve_device(device)
    run = runs.load(run_dir, weights=weights, device=dev)
    cfg = run.config
    data = run_data(cfg)
    autocast = torch.bfloat16 if dev.type == "cuda" else None
    t0 = time.perf_counter()
    result = evaluate_split(run.model, data, split, batch_size=batch_size, max_n=max_chunks, num_time_draws=draws,
                            num_steps=steps, seed=seed, device=dev, autocast_dtype=autocast, progress=progress,
                            seq_len=cfg.data.seq_len)
    baseline = data.baseline_bits(split, result["n_sequences"])
    result.update(
        split=split, run=str(run_dir), step=run.step, weights=run.weights, method=cfg.diffusion.method,
        corpus=cfg.data.corpus, seconds=time.perf_counter() - t0, **baseline,
    )
    path = Path(out) if out is not None else Path(run_dir) / eval_file_name(split, steps=steps, seed=seed, draws=draws)
    write_json_atomic(path, result)
    return result


def format_eval_table(result: dict[str, Any]) -> str:
    """A one-row Markdown table of a :func:`run_eval` result (bits/dim for images)."""
    lo, hi = result["ci95"]
    kind = f"discrete T={result['num_steps']}" if result.get("num_steps") else "continuous time"
    if "histogram_bits_per_dim" in result:
        return "\n".join([
            "| run | split | ELBO | bits/dim | ± stderr | 95% CI | per-pixel histogram | global histogram | images |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {result['run']} (step {result['step']}, {result['weights']}) | {result['split']} | {kind} "
            f"| {result['bits_per_token']:.4f} | {result['stderr']:.4f} | [{lo:.4f}, {hi:.4f}] "
            f"| {result['histogram_bits_per_dim']:.4f} | {result['unigram_bits_per_token']:.4f} | {result['n_sequences']} |",
        ])
    rows = [
        "| run | split | method | ELBO | bits/token | ± stderr | 95% CI | perplexity | unigram bits/token | sequences |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {result['run']} (step {result['step']}, {result['weights']}) | {result['split']} | {result['method']} | {kind} "
        f"| {result['bits_per_token']:.4f} | {result['stderr']:.4f} | [{lo:.4f}, {hi:.4f}] | {result['perplexity']:.3f} "
        f"| {result['unigram_bits_per_token']:.4f} | {result['n_sequences']} |",
    ]
    return "\n".join(rows)


def _matches(rec: dict[str, Any] | None, want: dict[str, Any]) -> bool:
    return bool(rec) and all(rec.get(k) == v for k, v in want.items())


def _cached_name(split: str, steps: int | None, n: int, seed: int, step: int) -> str:
    return eval_file_name(split, steps=steps)[:-5] + f"-n{n}-seed{seed}-step{step}.json"


def elbo_vs_steps(
    run_dir: str | os.PathLike,
    steps: Iterable[int] = (10, 100, 1000),
    *,
    split: str = "test",
    max_chunks: int | None = 1024,
    compute_missing: bool = True,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
) -> dict[int | None, dict[str, Any]]:
    """Evaluations for each T in ``steps`` and for continuous time (key ``None``), text or image runs.

    With ``compute_missing`` every point is made comparable: the same checkpoint, the same
    ``seed`` (so the same time/mask draws, discretised for L_T: a paired comparison) and the same
    first ``max_chunks`` sequences (``None``: the whole split). The run's own
    ``eval-<split>[-T<T>][-seed<S>].json`` (:func:`eval_file_name`) is used when it matches; a
    missing one is computed with :func:`run_eval` (which writes it); one that exists but does not
    match (say, a whole-split evaluation) is left alone and the matching figure is computed into
    ``RUN_DIR/plots/cache/``. Without ``compute_missing`` whatever exists is returned as it is.
    """
    run_dir = Path(run_dir)
    config = runs.read_run_config(run_dir)
    wanted: list[int | None] = sorted({int(s) for s in steps})
    if any(s < 1 for s in wanted):  # type: ignore[operator]
        raise ValueError(f"steps must be positive integers, got {list(steps)}")
    wanted.append(None)
    cache = run_dir / ELBO_CACHE
    points: dict[int | None, dict[str, Any]] = {}
    if not compute_missing:
        for s in wanted:
            rec = read_json(run_dir / eval_file_name(split, steps=s, seed=seed))
            if rec is None:
                pattern = eval_file_name(split, steps=s)[:-5] + f"-n*-seed{seed}-step*.json"
                cached = sorted(cache.glob(pattern), key=lambda p: p.stat().st_mtime)
                rec = read_json(cached[-1]) if cached else None
            if rec is not None:
                points[s] = rec
        return points

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint to evaluate")
    step = int(read_json(ckpt / "state.json")["step"])
    n = run_data(config).num_eval_sequences(split, config.data.seq_len)
    if max_chunks is not None:
        n = min(n, int(max_chunks))
    weights = "ema" if (ckpt / "ema.safetensors").is_file() else "raw"  # what run_eval's default loads
    want = {"step": step, "seed": seed, "n_sequences": n, "num_time_draws": 1, "weights": weights, "split": split}
    for s in wanted:
        own = run_dir / eval_file_name(split, steps=s, seed=seed)
        rec = read_json(own)
        if _matches(rec, want):
            points[s] = rec
            continue
        out = None
        if own.exists():
            out = cache / _cached_name(split, s, n, seed, step)
            rec = read_json(out)
            if _matches(rec, want):
                points[s] = rec
                continue
            print(f"{own.name} was computed differently (another checkpoint, seed or number of sequences); "
                  f"evaluating {n} sequences into {out}", file=sys.stderr)
        else:
            print(f"evaluating {split} split, {'T=' + str(s) if s else 'continuous time'}, {n} sequences → {own}",
                  file=sys.stderr)
        points[s] = run_eval(str(run_dir), split=split, steps=s, seed=seed, batch_size=batch_size,
                             max_chunks=n, device=device, progress=progress, out=out)
    return points
