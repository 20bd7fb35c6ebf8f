"""What the plots share: reading a run folder for a figure's labels and references, the Agg
figure and its atomic PNG write, and the smoothing of training curves.

:mod:`maskdiff.apps.plots` draws the figures; benchmarks that draw their own use
:func:`_figure` and :func:`_save` from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from maskdiff.data import CHAR_CORPORA
from maskdiff.fileio import atomic_path, read_json

# Colours (matplotlib's default cycle, named for readability).
BLUE, ORANGE, GREEN, RED, PURPLE, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#7f7f7f"


# ---------------------------------------------------------------------------------------------
# Reading a run folder


def _run_config(run_dir: Path) -> dict[str, Any]:
    cfg = read_json(run_dir / "config.json")
    if cfg is None:
        raise FileNotFoundError(
            f"{run_dir} is not a run folder: config.json is missing or unreadable "
            "(a run folder is made by `maskdiff train`)"
        )
    return cfg


def _unit(config: dict[str, Any]) -> str:
    """The axis unit of a run's likelihoods: characters for the built-in character corpora and
    ``data.tokenizer=char`` runs on one's own files, bytes for byte-level runs, else tokens."""
    data = config.get("data", {})
    if data.get("corpus") in CHAR_CORPORA:
        return "bits per character"
    if str(data.get("corpus", "")).lower() == "files":
        return {None: "bits per byte", "byte": "bits per byte", "char": "bits per character"}.get(
            data.get("tokenizer"), "bits per token")
    return "bits per token"


def _run_title(run_dir: Path, config: dict[str, Any]) -> str:
    name = config.get("name") or run_dir.name
    diff = config.get("diffusion", {})
    method = str(diff.get("method", "?"))
    label = {"md4": "MD4", "genmd4": "GenMD4", "ar": "AR baseline"}.get(method, method)
    if method == "md4" and diff.get("schedule"):
        label += f" ({diff['schedule']} schedule)"
    where = f"{name}" if name == run_dir.name else f"{name} — {run_dir.name}"
    return f"{where}: {label} on {config.get('data', {}).get('corpus', '?')}"


def _run_subtitle(config: dict[str, Any], step: int | None = None) -> str:
    m, d, t = config.get("model", {}), config.get("data", {}), config.get("train", {})
    parts = [
        f"{m.get('n_layers', '?')} layer{'' if m.get('n_layers') == 1 else 's'} × d_model {m.get('d_model', '?')}",
        f"seq_len {d.get('seq_len', '?')}",
        f"batch {t.get('batch_size', '?')}",
    ]
    if step is not None:
        parts.append(f"step {step:,} of {t.get('steps', 0):,}")
    else:
        parts.append(f"{t.get('steps', 0):,} steps")
    return ", ".join(parts)


def _eval_files(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Continuous-time whole-split evaluations of the run by split: ``eval-<split>.json``, else one
    at another batch size (``eval-<split>-b<B>.json``, e.g. the demo's)."""
    found = {}
    for split in ("train", "validation", "test"):
        for path in [run_dir / f"eval-{split}.json", *sorted(run_dir.glob(f"eval-{split}-b*[0-9].json"))]:
            rec = read_json(path)
            if isinstance(rec, dict) and "bits_per_token" in rec and not rec.get("num_steps"):
                found[split] = rec
                break
    return found


def _unigram_bits(run_dir: Path) -> tuple[float, str] | None:
    evals = _eval_files(run_dir)
    for split in ("test", "validation", "train"):
        if split in evals and evals[split].get("unigram_bits_per_token") is not None:
            return float(evals[split]["unigram_bits_per_token"]), split
    for path in sorted(run_dir.glob("eval-*.json")):
        rec = read_json(path)
        if rec and rec.get("unigram_bits_per_token") is not None:
            return float(rec["unigram_bits_per_token"]), str(rec.get("split", "?"))
    res = read_json(run_dir / "results.json")
    if res and res.get("unigram_bpc") is not None:
        return float(res["unigram_bpc"]), "test"
    return None


# ---------------------------------------------------------------------------------------------
# Figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # the non-interactive Agg canvas: no pyplot, no screen
    return fig


def _save(fig: Any, out_png: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``out_png`` atomically (the caller decides whether it may replace a file)."""
    out = Path(out_png)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; give a file name ending in .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def _smooth(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard-style smoothing)."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1.0 - weight) * v
        norm = weight * norm + (1.0 - weight)
        out.append(acc / norm)
    return out


def _auto_smoothing(n: int) -> float:
    """EMA weight for a window of about 1/20 of the records (3 to 200 records; none below 12 records)."""
    if n < 12:
        return 0.0
    window = min(200.0, max(3.0, n / 20.0))
    return 1.0 - 2.0 / (window + 1.0)
