"""The subcommands of 0.1: ``train | eval | sample | demo | compare | presets | zeroshot | plot | genppl``.

Each subcommand has a ``_add_<cmd>(sub)`` parser and a thin ``cmd_<cmd>(args)`` that calls a library
function (:mod:`maskdiff.training`, :mod:`maskdiff.apps`) with keyword arguments and prints. The
library modules are imported inside the handlers so that ``maskdiff --help`` starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["HANDLERS", "add_parsers"]



def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a preset",
                       description="Train MD4 / GenMD4 (or the AR baseline) from a named preset.")
    p.add_argument("--preset", default=None, help="preset name (see `maskdiff presets`); not needed with --resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=1000 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --out holds a run (the old folder is moved aside, not deleted)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="negative ELBO of a run on a data split, with error bars")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--draws", type=int, default=1, help="time draws per sequence (K ≥ 2 also gives the Monte Carlo error alone)")
    p.add_argument("--steps", type=int, default=None, help="discrete-time ELBO with T steps (default: continuous time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-chunks", type=int, default=None, help="evaluate only the first N chunks (images: N images)")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"])
    p.add_argument("--out", default=None,
                   help="write the result to this JSON file instead of RUN_DIR/eval-<split>[-<settings>].json "
                        "(e.g. for a read-only run folder)")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run (EMA weights)")
    p.add_argument("run_dir")
    p.add_argument("--num", type=int, default=4, help="number of samples")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: the run's seq_len)")
    p.add_argument("--steps", type=int, default=256, help="sampling steps T")
    p.add_argument("--grid", default="cosine", choices=["cosine", "uniform"])
    # The registry names cost no sampler import; docs/samplers.md describes them.
    from maskdiff.sampling.registry import sampler_names

    p.add_argument("--sampler", default="ancestral", choices=list(sampler_names()),
                   help="the sampler (docs/samplers.md: which are exact, their options); "
                        "--sampler-option help describes the chosen one")
    p.add_argument("--sampler-option", dest="sampler_options", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the chosen sampler, e.g. --sampler-option tau=0.9 (repeatable); "
                        "--sampler-option help lists the sampler's options")
    p.add_argument("--block-length", type=int, default=None,
                   help="generate left to right in blocks of this many positions, with --sampler inside each block")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--precision", default="float64", choices=["float64", "float32"],
                   help="categorical draws: float64 exact (default) or the reference float32 Gumbel-max")
    p.add_argument("--prompt", default=None, help="text the samples start with")
    p.add_argument("--suffix", default=None, help="text the samples end with")
    p.add_argument("--infill", default=None, help='template with gaps, e.g. "the ___ of the ___"')
    p.add_argument("--gap", default="___", help="gap marker in --infill")
    p.add_argument("--gap-length", type=int, default=16, help="tokens per gap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="call the network at every step")
    p.add_argument("--compute", default="auto", choices=["auto", "fp32", "bf16", "bf16-graph"],
                   help="network arithmetic for text runs: auto = bf16-graph on CUDA (bf16, replayed "
                        "from a CUDA graph), fp32 on the CPU")
    p.add_argument("--out", default=None,
                   help="text runs: write JSONL (text + settings) here instead of printing; "
                        "image runs: the PNG grid to write (default RUN_DIR/samples-<seed>.png)")
    p.add_argument("--device", default="auto")
    p.add_argument("--label", type=int, default=None, help="image runs: class of every sample")
    p.add_argument("--per-class", type=int, default=None,
                   help="image runs: a class grid with this many samples per class (one row per class)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w (image runs)")
    p.add_argument("--strip", action="store_true", help="image runs: also write a strip of the unmasking over time")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="train, evaluate and sample the CPU demo (what `make demo` runs)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="unigram, AR, MD4 and GenMD4 at one budget on the same data, as a table")
    c.add_argument("--preset", default="demo", help="data, network size, batch and optimiser shared by all methods")
    c.add_argument("--methods", default="ar,md4,genmd4", help="comma-separated: ar, md4, genmd4")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--draws", type=int, default=1, help="time draws per test sequence")
    c.add_argument("--max-chunks", type=int, default=None, help="evaluate only the first N test chunks")
    c.add_argument("--retrain", action="store_true",
                   help="runs in --out trained with another budget are moved aside (NAME.old-<time>) and trained "
                        "again (without it they are refused, never reused)")


def _add_zeroshot(sub: argparse._SubParsersAction) -> None:
    from maskdiff.apps.zeroshot import CONVENTIONS, DATASETS

    p = sub.add_parser(
        "zeroshot",
        help="zero-shot perplexity bound on LAMBADA, WikiText-2/103, PTB, One Billion Words",
        description="NELBO perplexity bound of a GPT-2-token run on the diffusion-LM papers' zero-shot data sets, "
        "read with Hugging Face datasets (Hub or local files), with the literature's detokenisers.",
    )
    p.add_argument("run_dir")
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help=f"comma-separated data sets (default: all: {','.join(DATASETS)})")
    p.add_argument("--path", dest="paths", action="append", default=[], metavar="NAME=FILE",
                   help="read a data set from a local file, glob or folder instead of the Hub (repeatable)")
    p.add_argument("--convention", default="concat", choices=list(CONVENTIONS),
                   help="concat: rows joined with end-of-text and cut into blocks; pad: one EOT-padded row each")
    p.add_argument("--split", default=None, help="split to evaluate (default: test)")
    p.add_argument("--draws", type=int, default=1, help="time draws per sequence")
    p.add_argument("--steps", type=int, default=None, help="discrete-time ELBO with T steps (default: continuous)")
    p.add_argument("--max-sequences", type=int, default=None, help="evaluate only the first N blocks/sequences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"])
    p.add_argument("--score-bos", action="store_true", help="pad: also score the leading end-of-text (as MDLM)")
    p.add_argument("--skip-empty", action="store_true", help="drop empty rows (kept by default, as in the papers)")
    p.add_argument("--no-progress", action="store_true")


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot", help="draw PNG plots of a run: training curves, GenMD4 exponents, ELBO vs steps",
        description="Write PNG plots of a run folder. By default: training curves, and the learned exponents for "
                    "GenMD4 runs, into RUN_DIR/plots/ (replacing earlier plots there). `--what elbo` evaluates the "
                    "discrete-time ELBO for each --steps T that has no eval file yet (this takes a while on big runs).",
    )
    p.add_argument("run_dir")
    p.add_argument("--what", default=None,
                   help="comma-separated: curves, exponents, elbo (default: curves, plus exponents for GenMD4 runs)")
    p.add_argument("--out", default=None,
                   help="folder for the PNGs (default RUN_DIR/plots/); files already in a folder of yours are "
                        "never replaced: a new name is chosen")
    p.add_argument("--steps", default="10,100,1000", help="T values for --what elbo (comma-separated)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="split for --what elbo")
    p.add_argument("--max-chunks", type=int, default=1024,
                   help="--what elbo: evaluate the first N chunks of the split (0: all of it; default 1024)")
    p.add_argument("--no-compute", action="store_true", help="--what elbo: plot only evaluations that exist")
    p.add_argument("--seed", type=int, default=0, help="--what elbo: evaluation seed (the same for every T)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--log-x", action="store_true", help="training curves against log(step)")


def _add_genppl(sub: argparse._SubParsersAction) -> None:
    from maskdiff.apps.genppl import SCORER_NAMES

    p = sub.add_parser(
        "genppl", help="generative perplexity of samples under a causal LM, with sample entropy",
        description="Sample from a run and score the samples under a causal language model (GPT-2 Large when "
                    "available, else the offline SmolLM2-135M); reports gen PPL with a 95% interval, the samples' "
                    "unigram entropy, the sampler settings and the categorical precision. Writes "
                    "RUN_DIR/genppl-<precision>.json.")
    p.add_argument("run_dir")
    p.add_argument("--num", type=int, default=32, help="number of samples")
    p.add_argument("--steps", type=int, default=256, help="sampling steps T")
    p.add_argument("--precision", default="float64", choices=["float64", "float32", "both"],
                   help="categorical draws: float64 exact, float32 reference Gumbel-max, or both (same seed)")
    p.add_argument("--scorer", default="auto", choices=list(SCORER_NAMES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--grid", default="cosine", choices=["cosine", "uniform"])
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: the run's seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per scorer forward pass")
    p.add_argument("--reference", action="store_true",
                   help="also score NUM chunks of the test split the same way (written to genppl-data.json)")
    p.add_argument("--device", default="auto")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub``, in the order ``maskdiff --help`` lists them."""
    _add_train(sub)
    _add_eval(sub)
    _add_sample(sub)
    _add_demo(sub)
    _add_compare(sub)
    sub.add_parser("presets", help="list the training presets")
    _add_zeroshot(sub)
    _add_plot(sub)
    _add_genppl(sub)


# ---------------------------------------------------------------------------------------------
# Handlers: parse, call the library, print.


def cmd_train(args: argparse.Namespace) -> int:
    from maskdiff.apps.checks import UsageError
    from maskdiff.config import apply_overrides, get_preset
    from maskdiff.runs import read_run_config
    from maskdiff.training import train

    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out RUN_DIR (the run to continue)")
        cfg_path = Path(args.out) / "config.json"
        if not cfg_path.is_file():
            raise UsageError(f"cannot resume: {cfg_path} not found; start the run without --resume")
        config = read_run_config(args.out)
        if args.preset:
            print("note: --resume uses the run's saved config; --preset is ignored", file=sys.stderr)
    else:
        if not args.preset:
            raise UsageError("--preset is required (see `maskdiff presets`)")
        config = get_preset(args.preset)
    config = apply_overrides(config, args.overrides)
    if args.print_config:
        print(config.to_json())
        return 0
    out = args.out or os.path.join("runs", config.name)
    result = train(config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if result and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        lo, hi = result["ci95"]
        print(f"validation: {result['bits_per_token']:.4f} bits/token (95% CI {lo:.4f}–{hi:.4f}); run folder {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from maskdiff.apps.likelihood import format_eval_table, run_eval

    result = run_eval(args.run_dir, split=args.split, draws=args.draws, steps=args.steps, seed=args.seed,
                      batch_size=args.batch_size, max_chunks=args.max_chunks, device=args.device, weights=args.weights,
                      out=args.out)
    print(format_eval_table(result))
    print(f"result in {result['file']}", file=sys.stderr)
    return 0


def _sampler_options(pairs: Sequence[str]) -> dict[str, str]:
    """``--sampler-option KEY=VALUE`` (repeated) as a dict of texts; the sampler converts them."""
    from maskdiff.apps.checks import UsageError

    options: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise UsageError(f"--sampler-option {pair!r}: write KEY=VALUE, e.g. --sampler-option tau=0.9 "
                             "(--sampler-option help lists the options)")
        if key in options:
            raise UsageError(f"--sampler-option {key} is given twice")
        options[key] = value.strip()
    return options


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from maskdiff.apps.checks import check_finite_weights, positive_int
    from maskdiff.apps.generate import check_sample_request, generate_text, sample_destination, write_image_samples
    from maskdiff.devices import resolve_device
    from maskdiff.runs import load
    from maskdiff.sampling.registry import get_sampler, sampler_class

    if "help" in args.sampler_options:
        print(sampler_class(args.sampler).describe())
        return 0
    # Everything that can be refused is refused before the weights are loaded and sampled.
    options = _sampler_options(args.sampler_options)
    positive_int("--block-length", args.block_length)
    get_sampler(args.sampler, {**options, "block_length": args.block_length})  # unknown or bad options
    check_sample_request(num=args.num, steps=args.steps, length=args.length, top_p=args.top_p, top_k=args.top_k,
                         temperature=args.temperature, guidance=args.guidance, per_class=args.per_class, gap=args.gap,
                         gap_length=args.gap_length, infill=args.infill, prompt=args.prompt, suffix=args.suffix)
    image, out = sample_destination(args.run_dir, out=args.out, seed=args.seed, strip=args.strip, prompt=args.prompt,
                                    suffix=args.suffix, infill=args.infill, length=args.length, top_k=args.top_k,
                                    label=args.label, per_class=args.per_class, guidance=args.guidance)
    dev = resolve_device(args.device)
    run = load(args.run_dir, device=dev)
    check_finite_weights(run)
    if image:
        written = write_image_samples(
            run, out, num=args.num, per_class=args.per_class, label=args.label, strip=args.strip, steps=args.steps,
            grid=args.grid, guidance=args.guidance, seed=args.seed, precision=args.precision,
            temperature=args.temperature, top_p=args.top_p, device=dev, sampler=args.sampler,
            sampler_options=options, block_length=args.block_length)
        print(f"wrote the samples to {written[0]}", file=sys.stderr)
        if len(written) > 1:
            print(f"wrote the unmasking strip to {written[1]}", file=sys.stderr)
        return 0
    with torch.no_grad():
        texts, settings = generate_text(
            run, num=args.num, length=args.length, steps=args.steps, grid=args.grid, sampler=args.sampler,
            top_p=args.top_p, top_k=args.top_k, temperature=args.temperature, precision=args.precision,
            prompt=args.prompt, suffix=args.suffix, infill=args.infill, gap=args.gap, gap_length=args.gap_length,
            seed=args.seed, cache=not args.no_cache, device=args.device, compute=args.compute,
            sampler_options=options, block_length=args.block_length,
        )
    if out is not None:
        from maskdiff.fileio import atomic_write

        with atomic_write(out) as f:
            for i, text in enumerate(texts):
                f.write((json.dumps({"index": i, "text": text, **settings}) + "\n").encode())
        print(f"wrote {len(texts)} samples to {out}", file=sys.stderr)
    else:
        for i, text in enumerate(texts):
            print(f"--- sample {i} ---\n{text}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the demo preset (resuming or reusing runs/demo), evaluate it, and print samples."""
    from maskdiff.apps.demo import run_demo

    run_demo(args.out, args.overrides)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from maskdiff.apps.compare import compare_methods, format_table

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    summary = compare_methods(args.preset, methods=methods, overrides=args.overrides, out_dir=args.out,
                              eval_draws=args.draws, max_chunks=args.max_chunks, retrain=args.retrain)
    print(format_table(summary))
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    from maskdiff.config import PRESETS, get_preset

    for name in PRESETS:
        c = get_preset(name)
        print(f"{name:18s} {c.diffusion.method:6s} {c.data.corpus:14s} seq {c.data.seq_len:5d}  "
              f"{c.model.n_layers}×{c.model.d_model}  batch {c.train.batch_size}  steps {c.train.steps}")
    return 0


def _parse_paths(items: Sequence[str] | None) -> dict[str, str]:
    """``--path NAME=FILE`` items as a dict (the data set names are checked by the app)."""
    paths: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--path takes NAME=FILE (e.g. --path wikitext2=wiki.test.raw), got {item!r}")
        paths[key.strip()] = value.strip()
    return paths


def cmd_zeroshot(args: argparse.Namespace) -> int:
    """``maskdiff zeroshot``: evaluate, write ``RUN_DIR/zeroshot.json``, print a Markdown table."""
    from maskdiff.apps.zeroshot import format_zeroshot_table, run_zeroshot

    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    summary = run_zeroshot(
        args.run_dir, names, paths=_parse_paths(args.paths), convention=args.convention, split=args.split,
        draws=args.draws, steps=args.steps, max_sequences=args.max_sequences, seed=args.seed,
        batch_size=args.batch_size, device=args.device, weights=args.weights, score_bos=args.score_bos,
        skip_empty=args.skip_empty, progress=not args.no_progress,
    )
    header = f"{summary['run']} (step {summary['step']}, {summary['weights']} weights)"
    print(format_zeroshot_table(summary["results"], header=header))
    print(f"\nresults in {summary['file']}")
    return 0


def _free_name(path: Path) -> Path:
    """``path`` if free, else ``stem-2.png``, ``stem-3.png``, ..."""
    if not path.exists():
        return path
    i = 2
    while (candidate := path.with_name(f"{path.stem}-{i}{path.suffix}")).exists():
        i += 1
    return candidate


def cmd_plot(args: argparse.Namespace) -> int:
    from maskdiff.apps.checks import UsageError, check_output_folder, check_run_writable, is_writable, positive_int
    from maskdiff.apps.plots import (
        FILE_NAMES,
        PLOTS_DIR,
        WHATS,
        plot_elbo_vs_steps,
        plot_genmd4_exponents,
        plot_training_curves,
    )
    from maskdiff.runs import read_run_config

    run_dir = Path(args.run_dir)
    method = read_run_config(run_dir).diffusion.method
    genmd4 = method == "genmd4"
    if args.what is None:
        whats = ["curves"] + (["exponents"] if genmd4 else [])
    else:
        whats = [w.strip() for w in args.what.split(",") if w.strip()]
        unknown = [w for w in whats if w not in WHATS]
        if unknown or not whats:
            raise UsageError(f"--what {args.what!r}: takes a comma-separated list of {', '.join(WHATS)}")
        if "exponents" in whats and not genmd4:
            raise UsageError(f"--what exponents needs a GenMD4 run; {run_dir} is a {method} run")
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        steps = []
    if "elbo" in whats and (not steps or min(steps) < 1):
        raise UsageError(f"--steps {args.steps!r}: takes comma-separated positive integers such as 10,100,1000")
    positive_int("--batch-size", args.batch_size)
    if args.max_chunks < 0:
        raise UsageError(f"--max-chunks {args.max_chunks}: must be a number of chunks ≥ 1 (0: the whole split)")

    ours = run_dir / PLOTS_DIR
    out_dir = Path(args.out) if args.out else ours
    replace = out_dir.resolve() == ours.resolve()  # RUN_DIR/plots/ is ours: plots there are regenerated
    if replace and not is_writable(ours if ours.is_dir() else run_dir):
        raise UsageError(f"{ours if ours.is_dir() else run_dir} is not writable; pass --out DIR to write the plots "
                         "elsewhere")
    check_output_folder(out_dir, "--out")
    if "elbo" in whats and not args.no_compute:
        check_run_writable(run_dir, "plot --what elbo", "it keeps the evaluations it computes there: pass --no-compute "
                           "to plot the evaluations that exist, or copy the run folder and plot the copy")
    out_dir.mkdir(parents=True, exist_ok=True)

    for what in whats:
        target = out_dir / FILE_NAMES[what].format(split=args.split)
        if not replace:
            target = _free_name(target)
        if what == "curves":
            path = plot_training_curves(run_dir, target, log_x=args.log_x)
        elif what == "exponents":
            path = plot_genmd4_exponents(run_dir, target)
        else:
            path = plot_elbo_vs_steps(run_dir, target, steps, split=args.split,
                                      max_chunks=args.max_chunks or None, compute_missing=not args.no_compute,
                                      seed=args.seed, batch_size=args.batch_size, device=args.device, progress=True)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_genppl(args: argparse.Namespace) -> int:
    """``maskdiff genppl``: write RUN_DIR/genppl-<precision>.json and print a table."""
    from maskdiff.apps.genppl import format_quality_table, run_genppl

    results = run_genppl(args.run_dir, precision=args.precision, scorer=args.scorer, reference=args.reference,
                         num=args.num, steps=args.steps, seed=args.seed, length=args.length, grid=args.grid,
                         top_p=args.top_p, top_k=args.top_k, temperature=args.temperature,
                         batch_size=args.batch_size, device=args.device)
    print(format_quality_table(results))
    return 0


HANDLERS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "demo": cmd_demo, "compare": cmd_compare,
            "presets": cmd_presets, "zeroshot": cmd_zeroshot, "plot": cmd_plot, "genppl": cmd_genppl}
