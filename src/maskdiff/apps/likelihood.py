"""A run's likelihood on a data split: the negative ELBO with error bars, written to a result file.

:func:`run_eval` is what ``maskdiff eval`` runs; :func:`eval_file_name` is the one naming rule for
its result files (so results of other settings never replace each other);
:func:`format_eval_table` prints one.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from maskdiff import runs
from maskdiff.apps.checks import (
    UsageError,
    WorkFailed,
    check_finite_weights,
    check_output_file,
    check_run_writable,
    positive_int,
    settings_differ,
)
from maskdiff.build import run_data
from maskdiff.checkpoint import latest_checkpoint
from maskdiff.devices import resolve_device
from maskdiff.evaluate import evaluate_split
from maskdiff.fileio import read_json, write_json_atomic

__all__ = ["eval_file_name", "run_eval", "check_eval_args", "format_eval_table", "elbo_vs_steps", "DEFAULT_EVAL_BATCH"]

# Where elbo_vs_steps keeps evaluations that must not replace the run's own eval files.
ELBO_CACHE = Path("plots") / "cache"


DEFAULT_EVAL_BATCH = 64  # `maskdiff eval --batch-size` default: results at this batch size keep the plain name


def eval_file_name(split: str, *, steps: int | None = None, seed: int = 0, draws: int = 1, n: int | None = None,
                   batch_size: int = DEFAULT_EVAL_BATCH, weights: str = "ema") -> str:
    """``eval-<split>[-T<T>][-seed<S>][-K<K>][-n<N>][-b<B>][-raw].json``: every setting that changes
    the result is in the name — time steps, seed, draws, the number ``n`` of sequences when only the
    first ``n`` of the split are scored, the batch size (it sets the draws) and the raw weights — so
    results of other settings never replace each other; the default settings (continuous time, seed
    0, one draw, the whole split, batch 64, EMA weights) keep ``eval-<split>.json``."""
    suffix = (f"-T{steps}" if steps else "") + (f"-seed{seed}" if seed else "") + (f"-K{draws}" if draws > 1 else "")
    suffix += (f"-n{n}" if n is not None else "") + (f"-b{batch_size}" if batch_size != DEFAULT_EVAL_BATCH else "")
    suffix += "-raw" if weights == "raw" else ""
    return f"eval-{split}{suffix}.json"


def check_eval_args(*, draws: int = 1, steps: int | None = None, batch_size: int = DEFAULT_EVAL_BATCH,
                    max_chunks: int | None = None, weights: str = "ema") -> None:
    """The evaluation settings, checked before anything is loaded (flags named as on the command line)."""
    positive_int("--draws", draws)
    positive_int("--steps", steps, fix="omit it for the continuous-time ELBO")
    positive_int("--batch-size", batch_size)
    positive_int("--max-chunks", max_chunks, fix="omit it to evaluate the whole split")
    if weights not in ("ema", "raw"):
        raise UsageError(f"--weights {weights}: must be ema or raw")


def split_size(data: Any, split: str, seq_len: int, source: str) -> int:
    """The number of sequences the split holds (whole chunks, or images); a split shorter than one
    chunk is refused naming its size and the fix (``source`` says whose data it is)."""
    total = data.num_eval_sequences(split, seq_len)
    if total < 1:
        what = "images" if data.image_shape is not None else f"tokens, fewer than one chunk of data.seq_len={seq_len}"
        raise UsageError(f"the {split} split of {source} holds {len(data.split(split))} {what}: "
                         "nothing to evaluate; choose another split or use more data")
    return total


def run_eval(run_dir: str | os.PathLike, *, split: str, draws: int = 1, steps: int | None = None, seed: int = 0,
             batch_size: int = 64, max_chunks: int | None = None, device: str = "auto",
             weights: str = "ema", progress: bool = True, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate a run on a split and write the result as JSON to ``out`` (default
    ``RUN_DIR/<eval_file_name(...)>``). Returns the result: bits per token with stderr and 95%
    interval, the unigram (text) or histogram (images) baseline of the same split, the settings.

    Everything is checked before the evaluation (settings, split size, writable destination,
    finite weights); a file at the destination that holds an evaluation with other settings is
    refused, never replaced. A non-finite result raises :class:`WorkFailed` and writes nothing.
    """
    check_eval_args(draws=draws, steps=steps, batch_size=batch_size, max_chunks=max_chunks, weights=weights)
    cfg = runs.read_run_config(run_dir)
    data = run_data(cfg, run_dir)  # a run on its own files is encoded with its stored vocabulary
    total = split_size(data, split, cfg.data.seq_len, f"{run_dir}'s data ({cfg.data.corpus})")
    n = max_chunks if max_chunks is not None and max_chunks < total else None
    if out is None:
        check_run_writable(run_dir, "eval", "pass --out FILE to write the result elsewhere")
        path = Path(run_dir) / eval_file_name(split, steps=steps, seed=seed, draws=draws, n=n,
                                              batch_size=batch_size, weights=weights)
    else:
        path = check_output_file(out, "--out", may_exist=True)
    dev = resolve_device(device)
    run = runs.load(run_dir, weights=weights, device=dev)
    check_finite_weights(run)
    wanted = dict(split=split, num_steps=steps, seed=seed, num_time_draws=draws, weights=run.weights,
                  n_sequences=n or total, batch_size=batch_size)
    differ = settings_differ(read_json(path), wanted)
    if differ:
        raise UsageError(f"{path} holds an evaluation with other settings ({'; '.join(differ)}) and is kept: "
                         "move it away or pass --out FILE")
    autocast = torch.bfloat16 if dev.type == "cuda" else None
    t0 = time.perf_counter()
    result = evaluate_split(run.model, data, split, batch_size=batch_size, max_n=max_chunks, num_time_draws=draws,
                            num_steps=steps, seed=seed, device=dev, autocast_dtype=autocast, progress=progress,
                            seq_len=cfg.data.seq_len)
    if not math.isfinite(result["bits_per_token"]):
        raise WorkFailed(f"the evaluation of {run_dir} (step {run.step}, {run.weights} weights) gave "
                         f"{result['bits_per_token']} bits/token; nothing was written ({path} is unchanged)")
    baseline = data.baseline_bits(split, result["n_sequences"])
    result.update(
        split=split, run=str(run_dir), step=run.step, weights=run.weights, method=cfg.diffusion.method,
        corpus=cfg.data.corpus, seconds=time.perf_counter() - t0, batch_size=batch_size, max_chunks=n, **baseline,
    )
    write_json_atomic(path, result)
    result["file"] = str(path)
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
    """Whether a stored evaluation has the wanted settings (files of older versions record no
    batch size: theirs is not compared)."""
    return isinstance(rec, dict) and all(rec[k] == v if k in rec else k == "batch_size" for k, v in want.items())


def _cached_name(split: str, steps: int | None, n: int, seed: int, step: int, batch_size: int) -> str:
    batch = f"-b{batch_size}" if batch_size != DEFAULT_EVAL_BATCH else ""
    return eval_file_name(split, steps=steps)[:-5] + f"-n{n}-seed{seed}-step{step}{batch}.json"


def _existing_points(run_dir: Path, wanted: list[int | None], split: str, seed: int) -> dict[int | None, Any]:
    """Whatever evaluation exists for each T (no computing): the run's own file — whole split,
    else a first-N one — else the newest in ``plots/cache/``."""
    points = {}
    for s in wanted:
        own = eval_file_name(split, steps=s, seed=seed)
        found = [run_dir / own] + sorted(run_dir.glob(own[:-5] + "-n*.json"))
        found += sorted((run_dir / ELBO_CACHE).glob(eval_file_name(split, steps=s)[:-5] + f"-n*-seed{seed}-step*.json"),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        rec = next((r for r in map(read_json, found) if isinstance(r, dict) and not r.get("num_time_draws", 1) > 1), None)
        if rec is not None:
            points[s] = rec
    return points


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
    ``seed`` (so the same time/mask draws, discretised for L_T: a paired comparison), the same
    batch size and the same first ``max_chunks`` sequences (``None``: the whole split). The run's
    own file (:func:`eval_file_name`: ``eval-<split>[-T<T>][-seed<S>][-n<N>][-b<B>].json``) is used
    when it matches; a missing one is computed with :func:`run_eval` (which writes it); one that
    exists but does not match (say, of an older checkpoint) is left alone and the matching figure is
    computed into ``RUN_DIR/plots/cache/``. Without ``compute_missing`` whatever exists is returned
    as it is.
    """
    run_dir = Path(run_dir)
    config = runs.read_run_config(run_dir)
    wanted: list[int | None] = sorted({int(s) for s in steps})
    if any(s < 1 for s in wanted):  # type: ignore[operator]
        raise UsageError(f"--steps {','.join(map(str, steps))}: T must be positive integers")
    wanted.append(None)
    if not compute_missing:
        return _existing_points(run_dir, wanted, split, seed)
    check_eval_args(batch_size=batch_size, max_chunks=max_chunks)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint to evaluate")
    step = int(read_json(ckpt / "state.json")["step"])
    total = split_size(run_data(config, run_dir), split, config.data.seq_len, f"{run_dir}'s data ({config.data.corpus})")
    n = total if max_chunks is None else min(total, max_chunks)
    weights = "ema" if (ckpt / "ema.safetensors").is_file() else "raw"  # what run_eval's default loads
    want = {"step": step, "seed": seed, "n_sequences": n, "num_time_draws": 1, "weights": weights, "split": split,
            "batch_size": batch_size}
    cache = run_dir / ELBO_CACHE
    points: dict[int | None, dict[str, Any]] = {}
    for s in wanted:
        own = run_dir / eval_file_name(split, steps=s, seed=seed, n=n if n < total else None, batch_size=batch_size)
        rec = read_json(own)
        if _matches(rec, want):
            points[s] = rec
            continue
        out = None
        if own.exists():
            out = cache / _cached_name(split, s, n, seed, step, batch_size)
            rec = read_json(out)
            if _matches(rec, want):
                points[s] = rec
                continue
            cache.mkdir(parents=True, exist_ok=True)
            print(f"{own.name} was computed differently (another checkpoint, seed or number of sequences); "
                  f"evaluating {n} sequences into {out}", file=sys.stderr)
        else:
            print(f"evaluating {split} split, {'T=' + str(s) if s else 'continuous time'}, {n} sequences → {own}",
                  file=sys.stderr)
        points[s] = run_eval(str(run_dir), split=split, steps=s, seed=seed, batch_size=batch_size,
                             max_chunks=n, device=device, progress=progress, out=out)
    return points
