"""Side-by-side comparison at one budget: unigram, autoregressive, MD4 and GenMD4 on the same data.

``maskdiff compare --preset demo --set train.steps=1000 --out runs/compare`` trains one model per method
with the preset's data, network size, batch, optimiser and number of steps (only the method —
and for AR the causal attention — differs), evaluates each on the test split with the same
evaluation seed, and writes ``compare.json`` and ``compare.md``.

Notes on fairness, also printed under the table:

* GenMD4 draws two masks per sequence (for its RLOO gradient), so it evaluates the network on
  twice as many sequences per step as MD4 at the same batch size.
* AR's figure is an exact negative log-likelihood; the diffusion figures are upper bounds
  (negative ELBOs), estimated by Monte Carlo with the stated standard error.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskdiff.apps.checks import UsageError, check_output_folder
from maskdiff.apps.likelihood import check_eval_args, run_eval, split_size
from maskdiff.build import run_data
from maskdiff.checkpoint import checkpoint_step
from maskdiff.config import RunConfig, apply_overrides, config_from_dict, get_preset
from maskdiff.fileio import atomic_write, folder_lock, read_json, write_json_atomic
from maskdiff.metrics import LN2, mean_estimate
from maskdiff.training import train

__all__ = ["compare_methods", "unigram_estimate", "format_table", "METHOD_OVERRIDES", "compare_file_name",
           "config_differences"]

METHOD_OVERRIDES: dict[str, list[str]] = {
    "ar": ["diffusion.method=ar", "model.causal=true", "model.time_conditioning=false"],
    "md4": ["diffusion.method=md4"],
    "genmd4": ["diffusion.method=genmd4"],
}


def unigram_estimate(train: np.ndarray, test: np.ndarray, vocab_size: int, seq_len: int) -> dict[str, Any]:
    """Unigram model fitted on train (add-one smoothing), scored on the test chunks, with stderr."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    n = len(test) // seq_len
    chunks = np.asarray(test[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    per_chunk_bits = -log_p[chunks].sum(1) / (seq_len * LN2)
    est = mean_estimate(torch.from_numpy(per_chunk_bits))
    return {"bits_per_token": est.mean, "stderr": est.stderr, "ci95": list(est.ci95), "n_sequences": n,
            "exact": True}


# Settings that do not change what a method's run learns or how it is scored (logging, saving,
# threads, devices, names): not compared when a folder is reused.
OPERATIONAL = frozenset({
    "name", "data.cache_dir", "train.device", "train.compile", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.save_every", "train.keep_checkpoints", "train.num_threads", "train.parallel",
})


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key=stored (now wanted)`` for every setting (but :data:`OPERATIONAL` ones) that differs.
    Both are read as configs first, so keys added since ``stored`` was written take their defaults."""
    try:
        stored = config_from_dict(stored).to_dict()
    except ValueError as err:
        return [f"an unreadable config ({err})"]
    a, b = _flat(stored), _flat(config_from_dict(wanted).to_dict())
    return [f"{k}={a.get(k)!r} (now {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if k not in OPERATIONAL and a.get(k) != b.get(k)]


def compare_file_name(*, draws: int = 1, seed: int = 0, max_chunks: int | None = None) -> str:
    """``compare[-K<K>][-seed<S>][-n<N>]``: tables of other evaluation settings never replace each other."""
    return "compare" + (f"-K{draws}" if draws > 1 else "") + (f"-seed{seed}" if seed else "") + \
        (f"-n{max_chunks}" if max_chunks is not None else "")


def _check_folder(out_dir: Path, configs: dict[str, RunConfig], base: RunConfig, name: str,
                  retrain: bool) -> tuple[dict[str, Any], list[str]]:
    """What the folder already holds, checked against this comparison before anything is trained.

    Returns (rows of the earlier table at the same budget to keep, methods to retrain). A method
    run or a table made with other settings is refused naming the fields, or with ``retrain``
    moved aside (``NAME.old-<time>``), never reused under the new label.
    """
    stale: list[str] = []
    problems: list[str] = []
    for method, cfg in configs.items():
        saved = read_json(out_dir / method / "config.json")
        if saved is not None and (diff := config_differences(saved, cfg.to_dict())):
            stale.append(method)
            problems.append(f"{out_dir / method} was trained with {', '.join(diff[:4])}"
                            + (f" and {len(diff) - 4} more" if len(diff) > 4 else ""))
    table = read_json(out_dir / f"{name}.json")
    keep: dict[str, Any] = {}
    if isinstance(table, dict):
        diff = config_differences(table["config"], base.to_dict()) if "config" in table else (
            [] if table.get("budget") == _budget(base) else ["the budget"])
        if diff:
            problems.append(f"{out_dir / name}.json holds a comparison with {', '.join(diff[:4])}")
            if retrain:
                for suffix in (".json", ".md"):
                    if (old := out_dir / f"{name}{suffix}").exists():
                        old.rename(_free(out_dir / f"{name}.old-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"))
        else:
            rows = table.get("rows")
            keep = {k: v for k, v in rows.items() if k != "unigram"} if isinstance(rows, dict) else {}
    if problems and not retrain:
        raise UsageError(f"{problems[0]}{' (and more)' if len(problems) > 1 else ''}: not reused for this "
                         "budget; pass --retrain to move the old runs aside and train again, or choose another --out")
    return keep, stale


def _free(path: Path) -> Path:
    i, candidate = 2, path
    while candidate.exists():
        candidate, i = path.with_name(f"{path.stem}-{i}{path.suffix}"), i + 1
    return candidate


def _budget(base: RunConfig) -> dict[str, Any]:
    return {"steps": base.train.steps, "batch_size": base.train.batch_size,
            "model": f"{base.model.n_layers} layers x {base.model.d_model}, {base.model.n_heads} heads"}


def compare_methods(
    preset: str = "demo",
    *,
    methods: tuple[str, ...] = ("ar", "md4", "genmd4"),
    overrides: list[str] | None = None,
    out_dir: str | Path = "runs/compare",
    eval_draws: int = 1,
    eval_seed: int = 0,
    max_chunks: int | None = None,
    progress: bool = True,
    retrain: bool = False,
) -> dict[str, Any]:
    """Train each method at the same budget, evaluate on the test split, and write a table
    (``compare.json`` and ``compare.md``; other evaluation settings: :func:`compare_file_name`).

    Everything is checked before training: the methods, the settings, a writable ``out_dir``, a
    test split of at least one chunk, and what ``out_dir`` already holds — a method's run trained
    with another config (another budget) is refused naming the fields, or with ``retrain`` moved
    aside and trained again; a finished run with the same config is reused, an unfinished one
    continued. The folder is locked for the whole comparison (one writer)."""
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHOD_OVERRIDES]
    if unknown or not methods:
        raise UsageError(f"--methods {','.join(methods)}: unknown method {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(METHOD_OVERRIDES)}")
    check_eval_args(draws=eval_draws, max_chunks=max_chunks)
    out_dir = check_output_folder(out_dir, "--out")
    base = apply_overrides(get_preset(preset), list(overrides or []))
    configs = {m: apply_overrides(base, METHOD_OVERRIDES[m] + [f"name={base.name}-{m}"]) for m in methods}
    data = run_data(base)
    split_size(data, "test", base.data.seq_len, f"data.corpus={base.data.corpus}")
    name = compare_file_name(draws=eval_draws, seed=eval_seed, max_chunks=max_chunks)
    with folder_lock(out_dir):
        keep, stale = _check_folder(out_dir, configs, base, name, retrain)
        rows: dict[str, Any] = {
            "unigram": unigram_estimate(data.train, data.test, data.vocab_size, base.data.seq_len),
            **keep,
        }
        for method, cfg in configs.items():
            rows[method] = _train_and_score(cfg, out_dir / method, method in stale, eval_draws=eval_draws,
                                            eval_seed=eval_seed, max_chunks=max_chunks, progress=progress)
        summary = {
            "preset": preset,
            "overrides": list(overrides or []),
            "corpus": base.data.corpus,
            "seq_len": base.data.seq_len,
            "budget": _budget(base),
            "eval": {"split": "test", "draws": eval_draws, "seed": eval_seed, "max_chunks": max_chunks},
            "config": base.to_dict(),
            "rows": rows,
        }
        write_json_atomic(out_dir / f"{name}.json", summary)
        with atomic_write(out_dir / f"{name}.md") as f:
            f.write((format_table(summary) + "\n").encode())
    return summary


def _train_and_score(cfg: RunConfig, run_dir: Path, stale: bool, *, eval_draws: int, eval_seed: int,
                     max_chunks: int | None, progress: bool) -> dict[str, Any]:
    """Train one method's run (reuse it when finished, continue it when not, start afresh when
    ``stale``: the old run is moved aside) and score it on the test split."""
    t0 = time.perf_counter()
    step = None if stale else checkpoint_step(run_dir)
    done = step is not None and step >= cfg.train.steps
    if not done:
        fresh = step is None and run_dir.exists() and any(run_dir.iterdir())
        train(cfg, run_dir, resume=step is not None, overwrite=fresh, progress=progress)
    seconds = time.perf_counter() - t0
    result = run_eval(str(run_dir), split="test", draws=eval_draws, seed=eval_seed, batch_size=128,
                      max_chunks=max_chunks, progress=progress)
    result["train_seconds"] = seconds if not done else None
    return result


LABELS = {
    "unigram": "unigram (fitted on train)",
    "ar": "autoregressive transformer (exact NLL)",
    "md4": "MD4 (NELBO, continuous time)",
    "genmd4": "GenMD4 (NELBO, continuous time)",
}


def format_table(summary: dict[str, Any]) -> str:
    b = summary["budget"]
    lines = [
        f"Test split of `{summary['corpus']}`, chunks of {summary['seq_len']} tokens; every model trained for "
        f"{b['steps']} steps at batch {b['batch_size']} ({b['model']}).",
        "",
        "| model | bits/token | ± stderr | 95% interval | sequences |",
        "|---|---|---|---|---|",
    ]
    for key, row in summary["rows"].items():
        lo, hi = row["ci95"]
        lines.append(f"| {LABELS.get(key, key)} | {row['bits_per_token']:.4f} | {row['stderr']:.4f} | "
                     f"[{lo:.4f}, {hi:.4f}] | {row['n_sequences']} |")
    lines += [
        "",
        "The stderr is over test chunks (it covers the Monte Carlo noise of the diffusion bounds and the "
        "variation between chunks). AR gives an exact likelihood, MD4/GenMD4 upper bounds. GenMD4 evaluates "
        "the network on two masked copies of each sequence per step (twice MD4's forward passes).",
    ]
    return "\n".join(lines)
