"""Every sampler at equal cost: generative perplexity, sample entropy, wall time and network calls.

One trained model, one run of this script. For every sampler (the exact ``ancestral``, ``mean``
and ``first-hitting``, and the approximate ones) and every budget of network calls per sample
(default 16, 32, 64 and L = the model's length), draw ``--num`` unconditional samples of the
model's full length and report

* the generative perplexity under the offline scorer (SmolLM2-135M, ``maskdiff genppl``'s
  scoring: every scorer token after ``<|endoftext|>``; token-weighted, 95% interval from the
  ratio estimator over samples);
* the per-sample unigram entropy (the entropy of the empirical distribution of each sample's
  own tokens, averaged over samples: the diffusion-LM convention), in bits per model token, with
  a 95% interval (mean ± 1.96 standard errors over samples);
* the time per sample of the sampling alone, CPU (process) time and wall time (the samples are
  drawn in ``--chunks`` batches; the median over batches of batch time / batch size, with the
  range; on a shared machine the CPU time of this one-thread process is the steadier figure), and
  the network calls per sample (``SampleInfo.nfe_per_sample``: rows evaluated / samples; the
  adaptive samplers evaluate the whole batch until its slowest sequence is done).

Grid samplers run ``num_steps`` = the budget. ``first-hitting`` makes exactly one call per free
position (L). ``threshold`` and ``entropy-bounded`` choose their number of calls: they run at
a few values of τ / γ and are reported at the calls they made.

Then the **frontier**: the same at one budget (``--frontier-budget``) as the temperature is
swept (``--temperatures``), gen PPL against entropy, one curve per sampler, plus a calibration
point for real text (``--num`` chunks of the test split). Written to ``--plot`` (left: gen PPL
against calls per sample at temperature 1; right: the frontier).

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_samplers.py runs/shared-compare/md4 \\
        --out runs/bench-samplers --plot docs/sampler-frontier.png

The run folder is only read. Results: ``OUT/results.json`` (every cell, with its texts) and
``OUT/table.md``; the table is printed as well.

With ``--image-grid PNG`` on an image run it draws instead one row of samples per sampler
(``ancestral``, ``first-hitting`` and the confidence-ordered samplers; one column per class):

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_samplers.py runs/mnist-tiny --image-grid docs/mnist-samplers.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: label -> (registry name, options). ``budget`` kinds: grid samplers use num_steps = budget.
GRID = [
    ("ancestral", "ancestral", {}),
    ("mean", "mean", {}),
    ("confidence", "confidence", {}),
    ("margin", "margin", {}),
    ("entropy", "entropy", {}),
    ("remdm-cap η=0.02", "remdm", {"strategy": "cap", "eta": 0.02}),
    ("remdm-rescale η=0.1", "remdm", {"strategy": "rescale", "eta": 0.1}),
    ("remdm-loop η=0.02", "remdm", {"strategy": "loop", "eta": 0.02}),
    ("confidence, blocks of 32", "confidence", {"block_length": 32}),
]
#: gridless samplers: label -> (name, options); one row each (adaptive ones at several knobs).
GRIDLESS = [
    ("first-hitting", "first-hitting", {}),
    ("threshold τ=0.9", "threshold", {"threshold": 0.9}),
    ("threshold τ=0.5", "threshold", {"threshold": 0.5}),
    ("threshold τ=0.3", "threshold", {"threshold": 0.3}),
    ("threshold τ=0.2", "threshold", {"threshold": 0.2}),
    ("threshold τ=0.18", "threshold", {"threshold": 0.18}),
    ("entropy-bounded γ=0.5", "entropy-bounded", {"gamma": 0.5}),
    ("entropy-bounded γ=4", "entropy-bounded", {"gamma": 4.0}),
    ("entropy-bounded γ=8", "entropy-bounded", {"gamma": 8.0}),
    ("entropy-bounded γ=32", "entropy-bounded", {"gamma": 32.0}),
]
#: the adaptive settings drawn on the frontier (one curve each): γ = 8 makes about as many calls as
#: the frontier budget on the demo model; τ = 0.18 is the fewest calls threshold decoding makes
#: there before it unmasks everything at once (at the all-masked state every confidence is ≈ 0.175).
FRONTIER_GRIDLESS = ("first-hitting", "threshold τ=0.18", "entropy-bounded γ=8")


def draw(run: Any, name: str, options: dict[str, Any], *, steps: int, num: int, chunks: int, seed: int,
         temperature: float) -> dict[str, Any]:
    """``num`` samples in ``chunks`` batches (seed + chunk index): tokens, calls, wall times."""
    import torch

    from maskdiff.sampling import sample

    model = run.model
    size = math.ceil(num / chunks)
    tokens, rows, calls, per_sample_s, cpu_s = [], 0, 0, [], []
    for c in range(chunks):
        b = min(size, num - c * size)
        if b <= 0:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            z, info = sample(model.denoiser, model.schedule, batch_size=b, length=run.config.data.seq_len,
                             vocab_size=model.vocab_size, num_steps=steps, sampler=name,
                             generator=torch.Generator().manual_seed(seed + c), temperature=temperature,
                             time_agnostic=not model.time_conditioning, return_info=True, **options)
        per_sample_s.append((time.perf_counter() - t0) / b)
        cpu_s.append((time.process_time() - c0) / b)
        tokens.append(z)
        rows += info.denoiser_rows
        calls += info.denoiser_calls
    return {"tokens": torch.cat(tokens), "calls_per_sample": rows / num, "batch_calls": calls,
            "seconds_per_sample": statistics.median(per_sample_s), "seconds_range": [min(per_sample_s), max(per_sample_s)],
            "cpu_seconds_per_sample": statistics.median(cpu_s), "cpu_seconds_range": [min(cpu_s), max(cpu_s)]}


def score(run: Any, scorer: Any, tokens: Any) -> dict[str, Any]:
    """gen PPL (95% CI) under the scorer and per-sample entropy (95% CI) of sample tokens (N, L)."""
    from maskdiff.apps.genppl import generative_perplexity, unigram_entropy
    from maskdiff.metrics import Z95

    texts = [run.tokenizer.decode(row.tolist()) for row in tokens]
    ppl = generative_perplexity(texts, scorer, batch_size=16)
    ent = unigram_entropy(tokens)
    half = Z95 * ent["per_sample_bits_stderr"]
    return {"gen_ppl": ppl["gen_ppl"], "gen_ppl_ci95": ppl["gen_ppl_ci95"], "scorer_bits_per_char": ppl["bits_per_char"],
            "entropy_bits": ent["per_sample_bits"], "entropy_ci95": [ent["per_sample_bits"] - half,
                                                                     ent["per_sample_bits"] + half],
            "texts": texts}


def cell(run: Any, scorer: Any, label: str, name: str, options: dict[str, Any], *, steps: int | None,
         args: argparse.Namespace, temperature: float = 1.0) -> dict[str, Any]:
    length = run.config.data.seq_len
    got = draw(run, name, options, steps=steps or length, num=args.num, chunks=args.chunks, seed=args.seed,
               temperature=temperature)
    out = {"label": label, "sampler": name, "options": options, "num_steps": steps, "temperature": temperature,
           "num": args.num, **{k: v for k, v in got.items() if k != "tokens"}, **score(run, scorer, got["tokens"])}
    return out


def fmt_row(r: dict[str, Any]) -> str:
    lo, hi = r["gen_ppl_ci95"]
    elo, ehi = r["entropy_ci95"]
    lo_s, hi_s = r["seconds_range"]
    lo_c, hi_c = r["cpu_seconds_range"]
    steps = "—" if r["num_steps"] is None else str(r["num_steps"])
    return (f"| {r['label']} | {steps} | {r['calls_per_sample']:.1f} | {r['gen_ppl']:.1f} [{lo:.1f}, {hi:.1f}] "
            f"| {r['entropy_bits']:.3f} [{elo:.3f}, {ehi:.3f}] | {1e3 * r['cpu_seconds_per_sample']:.0f} "
            f"({1e3 * lo_c:.0f}–{1e3 * hi_c:.0f}) | {1e3 * r['seconds_per_sample']:.0f} ({1e3 * lo_s:.0f}–{1e3 * hi_s:.0f}) |")


def table(rows: list[dict[str, Any]], reference: dict[str, Any] | None, unit: str, scorer: str) -> str:
    head = [f"gen PPL under {scorer} (per scorer token, 95% CI); entropy = per-sample unigram entropy in bits "
            f"per {unit} (95% CI); CPU and wall = sampling time per sample in ms, one thread (median over batches, "
            "range)", "",
            "| sampler | steps | calls/sample | gen PPL [95% CI] | entropy [95% CI] | CPU ms/sample | wall ms/sample |",
            "|---|---|---|---|---|---|---|"]
    body = [fmt_row(r) for r in rows]
    if reference is not None:
        lo, hi = reference["gen_ppl_ci95"]
        elo, ehi = reference["entropy_ci95"]
        body.append(f"| real text (test split) | — | — | {reference['gen_ppl']:.1f} [{lo:.1f}, {hi:.1f}] "
                    f"| {reference['entropy_bits']:.3f} [{elo:.3f}, {ehi:.3f}] | — | — |")
    return "\n".join(head + body)


#: distinct colours (matplotlib's tab10, then black and dark gold); marker and line style by family.
_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#000000", "#b8860b", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896"]


def _marker(name: str) -> str:
    return {"ancestral": "o", "mean": "o", "first-hitting": "o", "remdm": "^", "threshold": "D",
            "entropy-bounded": "D"}.get(name, "s")


def _line(name: str) -> str:
    """Solid: exact samplers; dashed: approximate ones."""
    return "-" if name in ("ancestral", "mean", "first-hitting") else "--"


def _curve(r: dict[str, Any]) -> str:
    """The curve a cell belongs to in the cost panel: its label, or for the adaptive samplers the
    sampler (one curve over its knob values)."""
    return r["sampler"] if r["sampler"] in ("threshold", "entropy-bounded") else r["label"]


def plot(results: dict[str, Any], path: str) -> None:
    """Left: gen PPL against calls per sample (temperature 1). Right: gen PPL against entropy as the
    temperature is swept at the frontier budget. 95% intervals as error bars."""
    from maskdiff.apps.plot_common import _figure, _save

    fig = _figure(16.0, 5.5)
    left, right = fig.subplots(1, 2)
    curves = list(dict.fromkeys(_curve(r) for r in results["budget"]))
    colours = {c: _COLOURS[i % len(_COLOURS)] for i, c in enumerate(curves)}
    by_curve: dict[str, list[dict[str, Any]]] = {}
    for r in results["budget"]:
        by_curve.setdefault(_curve(r), []).append(r)
    for curve, rs in by_curve.items():
        rs = sorted(rs, key=lambda r: r["calls_per_sample"])
        x = [r["calls_per_sample"] for r in rs]
        y = [r["gen_ppl"] for r in rs]
        err = [[r["gen_ppl"] - r["gen_ppl_ci95"][0] for r in rs], [r["gen_ppl_ci95"][1] - r["gen_ppl"] for r in rs]]
        knob = rs[0]["num_steps"] is None and len(rs) > 1  # adaptive: one point per knob value, labelled
        left.errorbar(x, y, yerr=err, marker=_marker(rs[0]["sampler"]), ms=5, lw=1.2, capsize=2, color=colours[curve],
                      label=curve + ({"threshold": " (τ labelled)", "entropy-bounded": " (γ labelled)"}[curve] if knob else ""),
                      ls=_line(rs[0]["sampler"]))
        if knob:
            for r_, x_, y_ in zip(rs, x, y):
                left.annotate(r_["label"].split(" ")[-1], (x_, y_), fontsize=6, xytext=(3, 3), textcoords="offset points",
                              color=colours[curve])
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("network calls per sample")
    left.set_ylabel(f"generative perplexity ({results['scorer_short']})")
    left.set_title("quality against cost (temperature 1)")
    left.grid(True, alpha=0.3)
    fr: dict[str, list[dict[str, Any]]] = {}
    colours.update({r["label"]: colours[_curve(r)] for r in results["frontier"] if _curve(r) in colours})
    for r in results["frontier"]:
        fr.setdefault(r["label"], []).append(r)
    for label, rs in fr.items():
        rs = sorted(rs, key=lambda r: r["temperature"])
        x = [r["entropy_bits"] for r in rs]
        y = [r["gen_ppl"] for r in rs]
        xerr = [[r["entropy_bits"] - r["entropy_ci95"][0] for r in rs], [r["entropy_ci95"][1] - r["entropy_bits"] for r in rs]]
        yerr = [[r["gen_ppl"] - r["gen_ppl_ci95"][0] for r in rs], [r["gen_ppl_ci95"][1] - r["gen_ppl"] for r in rs]]
        calls = statistics.median(r["calls_per_sample"] for r in rs)
        right.errorbar(x, y, xerr=xerr, yerr=yerr, marker=_marker(rs[0]["sampler"]), ms=5, lw=1.2, capsize=2,
                       color=colours.get(label, "k"), label=f"{label} ({calls:.0f} calls)", ls=_line(rs[0]["sampler"]))
        for r_, x_, y_ in zip(rs, x, y):
            if r_["temperature"] != 1.0:
                right.annotate(f"{r_['temperature']:g}", (x_, y_), fontsize=6, xytext=(2, -8), textcoords="offset points",
                               color=colours.get(label, "k"))
    ref = results.get("reference")
    if ref is not None:  # its gen PPL is far below every sampler's: a line at its entropy, the value in the label
        lo, hi = ref["gen_ppl_ci95"]
        right.axvline(ref["entropy_bits"], color="k", ls=":", lw=1.2,
                      label=f"real text: entropy {ref['entropy_bits']:.3f}, gen PPL {ref['gen_ppl']:.0f} [{lo:.0f}, {hi:.0f}]")
    right.set_yscale("log")
    right.set_xlabel(f"per-sample entropy (bits per {results['unit']})")
    right.set_ylabel(f"generative perplexity ({results['scorer_short']})")
    temps = ", ".join(f"{t:g}" for t in results["temperatures"])
    right.set_title(f"frontier: temperature {temps} at {results['frontier_budget']} calls (grid samplers)")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(f"Samplers at equal cost: {results['model']} ({results['num']} samples per point)", fontsize=11)
    _save(fig, path)


#: the samplers of the image grid: (label, registry name, options, num_steps).
IMAGE_SAMPLERS = [
    ("ancestral", "ancestral", {}, None),
    ("first-hitting", "first-hitting", {}, None),
    ("confidence", "confidence", {}, None),
    ("margin", "margin", {}, None),
    ("entropy", "entropy", {}, None),
]


def image_rows(run_dir: str, path: str, *, steps: int, guidance: float, seed: int, per_class: int) -> list[dict]:
    """One row of samples per sampler from an image run (one column per class, ``per_class`` each,
    with classifier-free ``guidance``; 10 unconditional samples for a run without classes), drawn
    with the same seed, written to ``path`` as one labelled figure. Returns what each row cost."""
    import numpy as np
    import torch

    from maskdiff import runs
    from maskdiff.apps.generate import generate_images
    from maskdiff.apps.images import image_grid
    from maskdiff.apps.plot_common import _figure, _save
    from maskdiff.sampling import sampler_names

    run = runs.load(run_dir, device="cpu")
    net = run.model.network
    shape = tuple(net.config.image_shape)
    labels = torch.arange(net.num_classes).repeat(per_class) if net.num_classes else None
    num = len(labels) if labels is not None else 10 * per_class
    rows = []
    for label, name, opts, t in IMAGE_SAMPLERS:
        if name not in sampler_names():
            continue
        t0 = time.perf_counter()
        with torch.no_grad():
            tokens, info = generate_images(run, num=num, steps=t or steps, labels=labels, guidance=guidance, seed=seed,
                                           sampler=name, sampler_options=opts, progress=False)
        rows.append({"label": label, "sampler": name, "steps": t or steps, "calls": info.denoiser_calls,
                     "seconds": time.perf_counter() - t0,
                     "image": np.asarray(image_grid(tokens.cpu(), shape, nrow=num, vocab_size=run.model.vocab_size,
                                                    padding=1))})
    fig = _figure(1.0 + 0.75 * num, 0.35 + 0.8 * len(rows))
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, rows):
        ax.imshow(r["image"], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{r['label']}\n{r['calls']} calls", rotation=0, ha="right", va="center", fontsize=8)
    what = f"classes 0–{net.num_classes - 1}, guidance {guidance:g}" if labels is not None else "unconditional"
    fig.suptitle(f"{run.config.name} (step {run.step}): {what}, seed {seed}", fontsize=9)
    _save(fig, path)
    return [{k: v for k, v in r.items() if k != "image"} for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="trained text run folder (only read)")
    p.add_argument("--out", default="runs/bench-samplers", help="folder for results.json and table.md")
    p.add_argument("--plot", default=None, help="write the figure here (PNG)")
    p.add_argument("--num", type=int, default=32, help="samples per cell")
    p.add_argument("--chunks", type=int, default=4, help="batches per cell (wall time: median over them)")
    p.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64], help="grid budgets besides L")
    p.add_argument("--frontier-budget", type=int, default=32)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.6, 0.8, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    p.add_argument("--scorer", default="smollm2-135m", choices=["smollm2-135m", "gpt2-large"])
    p.add_argument("--image-grid", default=None, metavar="PNG",
                   help="image run: write one row of samples per sampler here instead of the text benchmark")
    p.add_argument("--image-steps", type=int, default=64, help="grid samplers' steps for --image-grid")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance for --image-grid")
    p.add_argument("--per-class", type=int, default=1, help="samples per class for --image-grid")
    p.add_argument("--replot", action="store_true", help="only draw --plot again from OUT/results.json")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads((Path(args.out) / "results.json").read_text()), args.plot)
        return 0
    if args.image_grid:
        rows = image_rows(args.run_dir, args.image_grid, steps=args.image_steps, guidance=args.guidance,
                          seed=args.seed, per_class=args.per_class)
        for r in rows:
            print(f"{r['label']:14s} steps {r['steps']:4d}  calls {r['calls']:4d}  {r['seconds']:.1f} s")
        print(f"wrote {args.image_grid}", file=sys.stderr)
        return 0

    import torch
    from tqdm.auto import tqdm

    from maskdiff import runs
    from maskdiff.apps.genppl import load_scorer, reference_quality
    from maskdiff.data import CHAR_CORPORA
    from maskdiff.metrics import Z95
    from maskdiff.sampling import sampler_names

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run = runs.load(args.run_dir, device="cpu")
    length = run.config.data.seq_len
    scorer = load_scorer(args.scorer, "cpu")
    unit = "character" if run.config.data.corpus in CHAR_CORPORA else "GPT-2 token"
    known = set(sampler_names())
    budgets = sorted(set(args.budgets) | {length})
    jobs: list[tuple[str, str, dict[str, Any], int | None, float, str]] = []
    for label, name, opts in GRID:
        for b in budgets:
            jobs.append((label, name, opts, b, 1.0, "budget"))
    for label, name, opts in GRIDLESS:
        jobs.append((label, name, opts, None, 1.0, "budget"))
    for t in args.temperatures:
        if t == 1.0:
            continue
        for label, name, opts in GRID:
            jobs.append((label, name, opts, args.frontier_budget, t, "frontier"))
        for label, name, opts in GRIDLESS:
            if label in FRONTIER_GRIDLESS:
                jobs.append((label, name, opts, None, t, "frontier"))
    skipped = sorted({name for _, name, *_ in jobs if name not in known})
    jobs = [j for j in jobs if j[1] in known and (args.only is None or j[0] in args.only)]
    if skipped:
        print(f"not in this version's registry, skipped: {', '.join(skipped)}", file=sys.stderr)

    t_start = time.perf_counter()
    ref = reference_quality(run, num=args.num, scorer=scorer, length=length, device="cpu")
    reference = {"gen_ppl": ref["gen_ppl"], "gen_ppl_ci95": ref["gen_ppl_ci95"],
                 "entropy_bits": ref["entropy_per_sample_bits"],
                 "entropy_ci95": [ref["entropy_per_sample_bits"] - Z95 * ref["entropy_per_sample_bits_stderr"],
                                  ref["entropy_per_sample_bits"] + Z95 * ref["entropy_per_sample_bits_stderr"]]}
    budget_rows, frontier_rows = [], []
    for label, name, opts, steps, temp, kind in tqdm(jobs, desc="cells", unit="cell"):
        r = cell(run, scorer, label, name, opts, steps=steps, args=args, temperature=temp)
        (budget_rows if kind == "budget" else frontier_rows).append(r)
    # the frontier's temperature-1 points are the budget cells at the frontier budget (or gridless)
    frontier_labels = {label for label, *_ in GRID} | set(FRONTIER_GRIDLESS)
    frontier_rows += [r for r in budget_rows if r["label"] in frontier_labels and 1.0 in args.temperatures
                      and (r["num_steps"] in (None, args.frontier_budget))]
    total_s = time.perf_counter() - t_start

    results = {"model": f"{run.config.name} ({run.config.diffusion.method.upper()}, {run.config.data.corpus}, "
                        f"L = {length}, step {run.step})", "run": str(run.path), "step": run.step, "unit": unit,
               "scorer": scorer.label, "scorer_short": scorer.name, "num": args.num, "seed": args.seed,
               "budgets": budgets, "frontier_budget": args.frontier_budget, "temperatures": args.temperatures,
               "reference": reference, "budget": budget_rows, "frontier": frontier_rows, "seconds_total": total_s,
               "torch_threads": torch.get_num_threads(), "skipped": skipped}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    text = table(budget_rows, reference, unit, scorer.label)
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\n{len(jobs)} cells in {total_s / 60:.1f} min; wrote {out / 'results.json'}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
