"""The CPU demo (what ``make demo`` runs): train the demo preset, evaluate it on the test split,
print samples and an infilling example, and keep the figures in ``RUN/results.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from maskdiff.apps.generate import generate_text
from maskdiff.apps.likelihood import format_eval_table, run_eval
from maskdiff.checkpoint import checkpoint_step
from maskdiff.config import apply_overrides, get_preset
from maskdiff.fileio import write_json_atomic
from maskdiff.runs import read_run_config
from maskdiff.training import train

__all__ = ["run_demo"]

INFILL = "the history of ___ is the study of ___ in the past"


def _train_or_reuse(out: Path, overrides: list[str]) -> None:
    """Train the demo run in ``out``, continue it if unfinished, or reuse it if trained with the
    same config; a folder holding another config is refused, never replaced."""
    config = apply_overrides(get_preset("demo"), overrides)
    if not (out / "config.json").is_file():
        print(f"training the demo model (MD4, {config.model.n_layers} layers × {config.model.d_model}) on "
              f"character-level Wikipedia for {config.train.steps} steps; run folder {out}", file=sys.stderr)
        train(config, out)
        return
    saved = read_run_config(out)
    if saved.to_dict() != config.to_dict():
        raise ValueError(f"{out} holds a run with another config; move it away or pass --out DIR")
    step = checkpoint_step(out)
    if step is not None and step >= saved.train.steps:
        print(f"{out} is already trained; evaluating it again (delete the folder to retrain)", file=sys.stderr)
    else:
        print(f"continuing the unfinished run in {out}", file=sys.stderr)
        train(config, out, resume=step is not None, overwrite=step is None)


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | None = None) -> dict[str, Any]:
    """Train (or reuse), evaluate and sample the demo; print a report; return ``results.json``'s content."""
    out = Path(out)
    t_start = time.perf_counter()
    _train_or_reuse(out, list(overrides or []))
    t_train = time.perf_counter() - t_start

    result = run_eval(str(out), split="test", batch_size=128, progress=True)
    results: dict[str, Any] = {
        "test_bpc": result["bits_per_token"],
        "test_bpc_stderr": result["stderr"],
        "test_bpc_ci95": result["ci95"],
        "unigram_bpc": result["unigram_bits_per_token"],
        "gain_over_unigram_bpc": result["unigram_bits_per_token"] - result["bits_per_token"],
        "test_sequences": result["n_sequences"],
        "seq_len": result["seq_len"],
        "steps": result["step"],
        "train_and_setup_seconds": t_train,
    }
    with torch.no_grad():
        texts, settings = generate_text(str(out), num=3, steps=128, seed=0, progress=False)
        infilled, _ = generate_text(str(out), num=2, steps=128, seed=1, progress=False, infill=INFILL, gap_length=12)
    results["samples"] = texts
    results["sample_settings"] = settings
    results["infill_samples"] = infilled
    write_json_atomic(out / "results.json", results)
    lo, hi = result["ci95"]
    print()
    print(format_eval_table(result))
    print()
    print(f"test split: {result['bits_per_token']:.3f} bits/char (95% CI {lo:.3f}–{hi:.3f})   "
          f"unigram: {result['unigram_bits_per_token']:.3f} bits/char   "
          f"gain: {results['gain_over_unigram_bpc']:.3f} bits/char")
    print("\nsamples (128 cosine-grid steps, float64 draws):")
    for text in texts:
        print(f"  > {text}")
    print(f"\ninfilling '{INFILL}':")
    for text in infilled:
        print(f"  > {text}")
    print(f"\nresults in {out / 'results.json'}; total {time.perf_counter() - t_start:.0f} s")
    return results
