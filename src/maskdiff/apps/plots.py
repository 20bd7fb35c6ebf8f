"""Plots of a run folder, written as PNG files: ``maskdiff plot RUN_DIR``.

* :func:`plot_training_curves` — training bits/token (raw and smoothed) and validation bits/token
  with 95% intervals against the step (tokens seen on the top axis), the unigram entropy as a
  reference line and the final evaluation(s) when ``eval-<split>.json`` exists.
* :func:`plot_genmd4_exponents` — GenMD4's learned per-token exponents ``w_j`` (sorted, labelled
  with the token's text) and their min/mean/max over training.
* :func:`plot_elbo_vs_steps` — the discrete-time bound L_T against T (log axis) with 95% intervals,
  and the continuous-time bound L_∞ as a band; missing evaluations are computed.

Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot``, no screen, no change to
the global backend), and written atomically (temporary file, then rename).
"""

from __future__ import annotations

import math
import os
import unicodedata
from pathlib import Path
from typing import Any, Iterable

from maskdiff import runs
from maskdiff.apps.likelihood import elbo_vs_steps
from maskdiff.apps.plot_common import (
    BLUE,
    GREEN,
    GREY,
    ORANGE,
    PURPLE,
    RED,
    _auto_smoothing,
    _eval_files,
    _figure,
    _run_config,
    _run_subtitle,
    _run_title,
    _save,
    _smooth,
    _unigram_bits,
    _unit,
)
from maskdiff.data import CHAR_CORPORA
from maskdiff.metrics import Z95
from maskdiff.runs import read_metrics

__all__ = [
    "plot_training_curves",
    "plot_genmd4_exponents",
    "plot_elbo_vs_steps",
    "PLOTS_DIR",
    "FILE_NAMES",
    "WHATS",
]

PLOTS_DIR = "plots"
WHATS = ("curves", "exponents", "elbo")
FILE_NAMES = {
    "curves": "training-curves.png",
    "exponents": "genmd4-exponents.png",
    "elbo": "elbo-vs-steps-{split}.png",
}

def plot_training_curves(
    run_dir: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    log_x: bool = False,
    smoothing: float | None = None,
) -> Path:
    """Training and validation bits/token against the step; returns the PNG's path.

    Train: the logged values (each a mean over ``log_every`` steps) faint, and a debiased EMA of
    them (``smoothing`` = EMA weight in [0, 1); default: a window of 1/40 of the records).
    Validation (EMA weights, the first ``eval_batches`` batches) with 95% intervals (± Z95 · stderr, Z95 ≈ 1.96).
    Also drawn when present: the final continuous-time evaluation(s) ``eval-<split>.json`` and
    the unigram entropy of the evaluated split (a model that ignores context).
    """
    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    metrics = read_metrics(run_dir)
    train = [r for r in metrics["train"] if r.get("bits_per_token") is not None]
    val = [r for r in metrics.get("validation", []) if r.get("bits_per_token") is not None]
    if not train and not val:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no train or validation records yet")
    unit = _unit(config)

    fig = _figure(9.0, 5.2)
    ax = fig.add_subplot()
    if train:
        steps = [r["step"] for r in train]
        bpt = [r["bits_per_token"] for r in train]
        weight = _auto_smoothing(len(bpt)) if smoothing is None else float(smoothing)
        if not 0.0 <= weight < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        ax.plot(steps, bpt, color=BLUE, alpha=0.3, lw=1.0, label="train (logged means)")
        ax.plot(steps, _smooth(bpt, weight), color=BLUE, lw=1.8, label="train (smoothed)")
    if val:
        vs = [r["step"] for r in val]
        vb = [r["bits_per_token"] for r in val]
        ve = [Z95 * r["stderr"] if r.get("stderr") is not None and math.isfinite(r["stderr"]) else 0.0 for r in val]
        n = val[-1].get("n_sequences")
        label = "validation, EMA weights" + (f" ({n} seqs)" if n else "") + " ± 95% CI"
        ax.errorbar(vs, vb, yerr=ve, fmt="o-", color=ORANGE, ms=4.5, lw=1.2, capsize=3, label=label, zorder=3)

    last_step = max([r["step"] for r in train] + [r["step"] for r in val])
    colours = {"test": RED, "validation": PURPLE, "train": GREEN}
    from matplotlib.transforms import offset_copy

    for i, (split, rec) in enumerate(_eval_files(run_dir).items()):
        # Shifted right by a few points, so as not to hide the validation point of the same step.
        shifted = offset_copy(ax.transData, fig=fig, x=8 + 8 * i, y=0, units="points")
        step = rec.get("step", last_step)
        lo, hi = rec.get("ci95", [rec["bits_per_token"]] * 2)
        ax.errorbar([step], [rec["bits_per_token"]], yerr=[[rec["bits_per_token"] - lo], [hi - rec["bits_per_token"]]],
                    fmt="*", ms=12, color=colours[split], capsize=4, zorder=4, transform=shifted,
                    label=f"{split} split, continuous-time NELBO: {rec['bits_per_token']:.3f} "
                          f"[{lo:.3f}, {hi:.3f}] ({rec.get('n_sequences', '?')} seqs)")
    uni = _unigram_bits(run_dir)
    if uni is not None:
        ax.axhline(uni[0], color=GREY, ls="--", lw=1.2,
                   label=f"unigram entropy of the {uni[1]} split: {uni[0]:.3f}")

    if log_x:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 1 else f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(left=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(unit)
    ax.grid(True, alpha=0.3, which="both" if log_x else "major")

    # Tokens seen on the top axis (tokens per step is fixed: batch_size × seq_len).
    tokens_per_step = None
    with_tokens = [r for r in train if r.get("tokens") and r.get("step")]
    if with_tokens:
        tokens_per_step = with_tokens[-1]["tokens"] / with_tokens[-1]["step"]
    else:
        t, d = config.get("train", {}), config.get("data", {})
        if t.get("batch_size") and d.get("seq_len"):
            tokens_per_step = t["batch_size"] * d["seq_len"]
    if tokens_per_step:
        from matplotlib.ticker import EngFormatter

        tps = float(tokens_per_step)
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tps, lambda n: n / tps))
        if log_x:
            from matplotlib.ticker import LogLocator, NullFormatter

            top.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            top.xaxis.set_minor_formatter(NullFormatter())
        top.xaxis.set_major_formatter(EngFormatter(sep=""))
        top.set_xlabel(f"tokens seen ({int(tps):,} per step)")

    # Keep the interesting range: the first logged means of a fresh model can sit far above the rest.
    values = [r["bits_per_token"] for r in train] + [r["bits_per_token"] for r in val]
    if uni is not None:
        values.append(uni[0])
    if len(values) > 10:
        lower, upper = min(values), max(values)
        # The upper limit without the first 5% of the train records; used if those would squash the rest.
        rest = max(values[max(1, len(train) // 20):])
        if upper - lower > 1.5 * (rest - lower):
            upper = rest
        pad = 0.05 * (upper - lower if upper > lower else 1.0)
        ax.set_ylim(lower - pad, upper + 2 * pad)
    ax.legend(loc="upper right", fontsize=8.5, framealpha=0.9)
    fig.suptitle(_run_title(run_dir, config), fontsize=12)
    ax.set_title(_run_subtitle(config, last_step), fontsize=9, color="#444444")
    return _save(fig, out_png)


def _token_label(text: str, token_id: int, show_id: bool) -> str:
    """A readable label for one token's text: spaces as ␣, newlines as ↵, tabs as ⇥."""
    shown = []
    for ch in text:
        if ch == " ":
            shown.append("␣")
        elif ch == "\n":
            shown.append("↵")
        elif ch == "\t":
            shown.append("⇥")
        elif unicodedata.category(ch)[0] == "C":
            shown.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            shown.append(ch)
    label = "".join(shown) or "∅"
    label = label.replace("$", r"\$")  # matplotlib would read $...$ as mathtext
    if len(label) > 18:
        label = label[:17] + "…"
    return f"{label} ({token_id})" if show_id else label


def _decode_one(tokenizer: Any, token_id: int) -> str:
    try:
        return tokenizer.decode([token_id])
    except Exception:  # a byte-level piece that is not valid UTF-8 alone, or an id outside the tokenizer
        return "\ufffd"


_DIRECTION = (
    r"$\alpha_{t,j} = 1-(1-\varepsilon)\,t^{w_j}$ is the chance that token $j$ is still unmasked at time $t$."
    "\nLarger $w_j$ → smaller $t^{w_j}$ → larger α: masked later in the forward process, "
    "so revealed earlier when generating (t: 1 → 0).\nSmaller $w_j$: masked early, revealed late."
)


def plot_genmd4_exponents(run_dir: str | os.PathLike, out_png: str | os.PathLike, *, top: int = 30) -> Path:
    """GenMD4's learned exponent per token (sorted, labelled) and min/mean/max over training.

    Up to 64 vocabulary entries (character runs) every token is shown; larger vocabularies
    (GPT-2) show the ``top`` largest and smallest exponents and a histogram of all of them.
    """
    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    if config.get("diffusion", {}).get("method") != "genmd4":
        raise ValueError(
            f"{run_dir} is a {config.get('diffusion', {}).get('method', '?')} run; "
            "learned exponents exist only for GenMD4 runs"
        )
    run = runs.load(run_dir, device="cpu")
    schedule = run.model.schedule
    w = schedule.exponents.detach().double().cpu().numpy()
    init = float(getattr(schedule, "init_exponent", config["diffusion"].get("init_exponent", 1.0)))
    tokenizer = run.tokenizer
    vocab = len(w)
    char_run = config.get("data", {}).get("corpus") in CHAR_CORPORA
    order = sorted(range(vocab), key=lambda j: -w[j])
    shown = order if vocab <= 64 else order[:top] + order[-top:]
    labels = {j: _token_label(_decode_one(tokenizer, j), j, show_id=not char_run) for j in shown}

    try:
        history = [r for r in read_metrics(run_dir)["train"] if "w_mean" in r]
    except FileNotFoundError:
        history = []

    small = vocab <= 64
    fig = _figure(11.0 if small else 12.0, 8.2 if small else 11.0)
    if small:
        grid = fig.add_gridspec(2, 1, height_ratios=[1.35, 1.0])
        ax = fig.add_subplot(grid[0])
        xs = range(vocab)
        # Bars start at the initial exponent: up = grew during training, down = shrank.
        ax.bar(xs, [w[j] - init for j in order], bottom=init, color=[BLUE if w[j] >= init else ORANGE for j in order],
               width=0.75)
        ax.set_xticks(list(xs), [labels[j] for j in order], fontsize=11)
        ax.axhline(init, color=RED, ls="--", lw=1.2, label=f"initial exponent {init:g}")
        ax.set_xlim(-0.7, vocab - 0.3)
        lo, hi = min(float(w.min()), init), max(float(w.max()), init)
        span = max(hi - lo, 1e-6)
        ax.set_ylim(max(0.0, lo - 0.1 * span), hi + 0.1 * span)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_ylabel(r"exponent $w_j$")
        ax.set_xlabel("token (sorted by learned exponent; ␣ = space)")
        ax.legend(loc="upper right", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(_DIRECTION, fontsize=9, color="#333333", loc="left")
        hist_ax = fig.add_subplot(grid[1])
    else:
        grid = fig.add_gridspec(2, 3, height_ratios=[2.0, 1.0])
        k = min(top, vocab // 2)
        panels = ((order[:k], f"largest {k} exponents (revealed earliest)"),
                  (order[-k:], f"smallest {k} exponents (revealed last)"))
        for col, (ids, title) in enumerate(panels):
            bar_ax = fig.add_subplot(grid[0, col])
            ys = list(range(len(ids)))
            bar_ax.barh(ys, [w[j] for j in ids], color=BLUE if col == 0 else ORANGE, height=0.75)
            bar_ax.set_yticks(ys, [labels[j] for j in ids], fontsize=8)
            bar_ax.invert_yaxis()
            bar_ax.axvline(init, color=RED, ls="--", lw=1.2, label=f"initial {init:g}")
            vals = [w[j] for j in ids] + [init]
            span = max(vals) - min(vals) or 0.1
            bar_ax.set_xlim(max(0.0, min(vals) - 0.1 * span), max(vals) + 0.1 * span)
            bar_ax.set_xlabel(r"exponent $w_j$")
            bar_ax.set_title(title, fontsize=10)
            bar_ax.grid(True, axis="x", alpha=0.3)
            bar_ax.legend(loc="lower right", fontsize=8)
        all_ax = fig.add_subplot(grid[0, 2])
        all_ax.hist(w, bins=60, color=GREY)
        all_ax.axvline(init, color=RED, ls="--", lw=1.2)
        all_ax.set_yscale("log")
        all_ax.set_xlabel(r"exponent $w_j$")
        all_ax.set_ylabel("tokens")
        all_ax.set_title(f"all {vocab:,} tokens", fontsize=10)
        hist_ax = fig.add_subplot(grid[1, :])
        hist_ax.set_title(_DIRECTION, fontsize=9, color="#333333", loc="left")

    # Second panel: min / mean / max over training (raw weights, as logged by the trainer).
    if history:
        hs = [r["step"] for r in history]
        hist_ax.fill_between(hs, [r["w_min"] for r in history], [r["w_max"] for r in history], color=BLUE, alpha=0.2,
                             label="min – max over tokens")
        hist_ax.plot(hs, [r["w_mean"] for r in history], color=BLUE, lw=1.6, label="mean over tokens")
        hist_ax.axhline(init, color=RED, ls="--", lw=1.2, label=f"initial exponent {init:g}")
        hist_ax.set_xlabel("training step")
        hist_ax.set_ylabel(r"$w$")
        hist_ax.legend(loc="upper left", fontsize=8.5)
        hist_ax.grid(True, alpha=0.3)
        hist_ax.set_xlim(left=0)
        hist_ax.ticklabel_format(axis="y", useOffset=False)
        if not small:
            hist_ax.set_title(_DIRECTION, fontsize=9, color="#333333", loc="left")
        else:
            hist_ax.set_title("exponents during training (raw weights; the bars above use the "
                              f"{run.weights.upper()} weights of step {run.step:,})", fontsize=9)
    else:
        hist_ax.text(0.5, 0.5, "no w_min / w_mean / w_max records in metrics.jsonl", ha="center", va="center",
                     transform=hist_ax.transAxes, color=GREY)
        hist_ax.set_axis_off()
    fig.suptitle(f"{_run_title(run_dir, config)} — learned masking exponents $w_j$ "
                 f"(step {run.step:,}, {run.weights} weights)", fontsize=12)
    return _save(fig, out_png)


# ---------------------------------------------------------------------------------------------
# ELBO against the number of steps


def plot_elbo_vs_steps(
    run_dir: str | os.PathLike,
    out_png: str | os.PathLike,
    steps: Iterable[int] = (10, 100, 1000),
    split: str = "test",
    max_chunks: int | None = 1024,
    compute_missing: bool = True,
    *,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
) -> Path:
    """Discrete-time NELBO L_T (bits/token, 95% CI) against T, with the continuous-time L_∞ as a band.

    See :func:`maskdiff.apps.likelihood.elbo_vs_steps` for where the figures come from and when they are computed.
    """
    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    points = elbo_vs_steps(run_dir, steps, split=split, max_chunks=max_chunks, compute_missing=compute_missing,
                         seed=seed, batch_size=batch_size, device=device, progress=progress)
    discrete = sorted((s, r) for s, r in points.items() if s is not None)
    cont = points.get(None)
    if not discrete and cont is None:
        raise FileNotFoundError(
            f"no eval-{split}-T<steps>.json in {run_dir}; run `maskdiff eval {run_dir} --split {split} --steps T` "
            f"or plot with compute_missing"
        )
    unit = _unit(config)
    fig = _figure(8.0, 5.0)
    ax = fig.add_subplot()
    if cont is not None:
        lo, hi = cont["ci95"]
        ax.axhspan(lo, hi, color=GREEN, alpha=0.18, lw=0,
                   label=f"continuous time $L_\\infty$: 95% CI [{lo:.4f}, {hi:.4f}]")
        ax.axhline(cont["bits_per_token"], color=GREEN, lw=1.5,
                   label=f"continuous time $L_\\infty$ = {cont['bits_per_token']:.4f}")
    if discrete:
        ts = [s for s, _ in discrete]
        vals = [r["bits_per_token"] for _, r in discrete]
        err_lo = [r["bits_per_token"] - r["ci95"][0] for _, r in discrete]
        err_hi = [r["ci95"][1] - r["bits_per_token"] for _, r in discrete]
        ax.errorbar(ts, vals, yerr=[err_lo, err_hi], fmt="o-", color=BLUE, ms=6, capsize=4, lw=1.4,
                    label="discrete time $L_T$ ± 95% CI", zorder=3)
        for t, v in zip(ts, vals):
            note = f"{v:.4f}"
            if cont is not None:
                note += f"\n{v - cont['bits_per_token']:+.4f} vs $L_\\infty$"
            ax.annotate(note, (t, v), textcoords="offset points", xytext=(8, 6), fontsize=8, color="#222222",
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.75))
        ax.set_xscale("log")
        ax.set_xticks(ts, [f"{t:,}" for t in ts])
        ax.set_xlim(min(ts) / 2.5, max(ts) * 4)
        ax.minorticks_off()
    ax.set_xlabel("number of discrete time steps T (log scale)")
    ax.set_ylabel(f"negative ELBO, {unit}")
    ax.grid(True, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8.5, frameon=False)

    recs = [r for _, r in discrete] + ([cont] if cont is not None else [])
    keys = {(r.get("n_sequences"), r.get("seed"), r.get("step"), r.get("num_time_draws")) for r in recs}
    first = recs[0]
    if len(keys) == 1:
        sub = (f"{split} split: the same {first.get('n_sequences', '?')} sequences × {first.get('seq_len', '?')} "
               f"tokens and seed {first.get('seed')} for every point (paired draws), checkpoint step "
               f"{first.get('step', '?'):,}.\n"
               "The bars include the variation between sequences, which all points share.")
    else:
        sub = ("not a paired comparison — the points differ in sequences / seed / checkpoint: "
               + "; ".join(f"{'T=' + str(s) if s else 'L∞'}: n={r.get('n_sequences')}, seed={r.get('seed')}, "
                           f"step={r.get('step')}" for s, r in sorted(points.items(), key=lambda kv: kv[0] or 10**12)))
    ax.set_title(sub, fontsize=8.5, color="#444444", wrap=True)
    fig.suptitle(f"{_run_title(run_dir, config)} — ELBO vs number of steps", fontsize=12)
    return _save(fig, out_png)
