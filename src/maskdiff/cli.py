"""Command-line interface: ``maskdiff train | eval | sample | demo | presets``.

Nothing in the library imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]


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


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run (EMA weights)")
    p.add_argument("run_dir")
    p.add_argument("--num", type=int, default=4, help="number of samples")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: the run's seq_len)")
    p.add_argument("--steps", type=int, default=256, help="sampling steps T")
    p.add_argument("--grid", default="cosine", choices=["cosine", "uniform"])
    p.add_argument("--sampler", default="ancestral", choices=["ancestral", "mean"])
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskdiff", description="Masked discrete diffusion (MD4 / GenMD4).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_sample(sub)
    d = sub.add_parser("demo", help="train, evaluate and sample the CPU demo (what `make demo` runs)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c = sub.add_parser("compare", help="unigram, AR, MD4 and GenMD4 at one budget on the same data, as a table")
    c.add_argument("--preset", default="demo", help="data, network size, batch and optimiser shared by all methods")
    c.add_argument("--methods", default="ar,md4,genmd4", help="comma-separated: ar, md4, genmd4")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--draws", type=int, default=1, help="time draws per test sequence")
    c.add_argument("--max-chunks", type=int, default=None, help="evaluate only the first N test chunks")
    sub.add_parser("presets", help="list the training presets")
    from maskdiff import genppl, plots, zeroshot

    zeroshot.register_cli(sub)
    plots.register_cli(sub)
    genppl.register_cli(sub)
    return parser


# ---------------------------------------------------------------------------------------------


def _device(name: str) -> Any:
    """The torch device for a ``--device`` value (see :func:`maskdiff.devices.resolve_device`)."""
    from maskdiff.devices import resolve_device

    return resolve_device(name)


def cmd_train(args: argparse.Namespace) -> int:
    from maskdiff.config import apply_overrides, config_from_dict, get_preset
    from maskdiff.trainer import train

    if args.resume:
        if args.out is None:
            raise SystemExit("error: --resume needs --out RUN_DIR (the run to continue)")
        cfg_path = Path(args.out) / "config.json"
        if not cfg_path.is_file():
            raise SystemExit(f"error: cannot resume: {cfg_path} not found; start the run without --resume")
        config = config_from_dict(json.loads(cfg_path.read_text()))
        if args.preset:
            print("note: --resume uses the run's saved config; --preset is ignored", file=sys.stderr)
    else:
        if not args.preset:
            raise SystemExit("error: --preset is required (see `maskdiff presets`)")
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


def eval_file_name(split: str, *, steps: int | None = None, seed: int = 0, draws: int = 1) -> str:
    """``eval-<split>[-T<T>][-seed<S>][-K<K>].json``: results of other settings never replace the
    default ``eval-<split>.json``."""
    suffix = (f"-T{steps}" if steps else "") + (f"-seed{seed}" if seed else "") + (f"-K{draws}" if draws > 1 else "")
    return f"eval-{split}{suffix}.json"


def run_eval(run_dir: str, *, split: str, draws: int = 1, steps: int | None = None, seed: int = 0,
             batch_size: int = 64, max_chunks: int | None = None, device: str = "auto",
             weights: str = "ema", progress: bool = True, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate a run on a split and write the result as JSON to ``out`` (default
    ``RUN_DIR/<eval_file_name(...)>``)."""
    from maskdiff.checkpoint import load, write_json_atomic
    from maskdiff.data import ImageSplits, unigram_entropy_bits
    from maskdiff.evaluate import evaluate_images, evaluate_nelbo
    from maskdiff.trainer import load_data

    dev = _device(device)
    run = load(run_dir, weights=weights, device=dev)
    cfg = run.config
    data = load_data(cfg)
    autocast = None
    if dev.type == "cuda":
        import torch

        autocast = torch.bfloat16
    t0 = time.perf_counter()
    if isinstance(data, ImageSplits):
        from maskdiff.images import histogram_bits_per_dim

        images = data.split(split)
        labels = data.labels(split) if run.model.network.num_classes else None
        result = evaluate_images(run.model, images, labels, batch_size=batch_size, max_images=max_chunks,
                                 num_time_draws=draws, num_steps=steps, seed=seed, device=dev,
                                 autocast_dtype=autocast, progress=progress)
        hist = histogram_bits_per_dim(data.train, images[: result["n_sequences"]], data.vocab_size)
        baseline = {"unigram_bits_per_token": hist["global"], "histogram_bits_per_dim": hist["per_dim"]}
    else:
        tokens = data.split(split)
        result = evaluate_nelbo(run.model, tokens, seq_len=cfg.data.seq_len, batch_size=batch_size,
                                num_time_draws=draws, num_steps=steps, seed=seed, max_chunks=max_chunks,
                                device=dev, autocast_dtype=autocast, progress=progress)
        baseline = {"unigram_bits_per_token": unigram_entropy_bits(data.train, tokens, data.vocab_size)}
    result.update(
        split=split, run=str(run_dir), step=run.step, weights=run.weights, method=cfg.diffusion.method,
        corpus=cfg.data.corpus, seconds=time.perf_counter() - t0, **baseline,
    )
    path = Path(out) if out is not None else Path(run_dir) / eval_file_name(split, steps=steps, seed=seed, draws=draws)
    write_json_atomic(path, result)
    return result


def format_eval_table(result: dict[str, Any]) -> str:
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


def cmd_eval(args: argparse.Namespace) -> int:
    result = run_eval(args.run_dir, split=args.split, draws=args.draws, steps=args.steps, seed=args.seed,
                      batch_size=args.batch_size, max_chunks=args.max_chunks, device=args.device, weights=args.weights)
    print(format_eval_table(result))
    return 0


def generate_tokens(run_dir: str | Any, *, num: int = 4, length: int | None = None, steps: int = 256,
                  grid: str = "cosine", sampler: str = "ancestral", top_p: float | None = None,
                  top_k: int | None = None, temperature: float = 1.0, precision: str = "float64",
                  prompt: str | None = None, suffix: str | None = None, infill: str | None = None,
                  gap: str = "___", gap_length: int = 16, seed: int = 0, cache: bool = True,
                  device: str = "auto", progress: bool = True, compute: str = "auto",
                  ) -> tuple[Any, dict[str, Any], Any]:
    """Sample ``num`` token sequences from a text run folder (or an already loaded run).

    Returns (tokens (num, length) on the CPU, settings, the loaded run). Bad requests raise
    ValueError naming the fix (the command line prints them as one line).

    ``compute``: ``fp32`` (the network in float32), ``bf16`` (autocast, CUDA), ``bf16-graph``
    (autocast, replayed from a CUDA graph: :class:`maskdiff.graphs.GraphDenoiser`); ``auto`` is
    ``bf16-graph`` on CUDA and ``fp32`` elsewhere.
    """
    import torch

    from maskdiff.graphs import GraphDenoiser

    from maskdiff.checkpoint import LoadedRun, load
    from maskdiff.sampling import fixed_from_template, make_fixed, sample

    dev = _device(device)
    run = run_dir if isinstance(run_dir, LoadedRun) else load(run_dir, device=dev)
    if run.model.network.config.image_shape is not None:
        raise ValueError("this is an image run; `maskdiff sample` writes image grids for it")
    model, cfg, tok = run.model, run.config, run.tokenizer
    if cfg.diffusion.method == "ar":
        raise ValueError("this run is the autoregressive baseline; `maskdiff sample` draws from diffusion runs")
    length = length or cfg.data.seq_len
    if length > cfg.data.seq_len:
        raise ValueError(f"--length {length} exceeds the model's sequence length {cfg.data.seq_len}")

    def encode(text: str) -> list[int]:
        if hasattr(tok, "encode") and cfg.data.corpus in ("wiki-char", "text8"):
            return tok.encode(text, normalize=True)
        return tok.encode(text)

    fixed = None
    if infill is not None:
        if prompt or suffix:
            raise ValueError("use either --infill or --prompt/--suffix, not both")

        class _Enc:  # the template's text pieces go through the same normalisation as prompts
            def encode(self, text: str) -> list[int]:
                return encode(text)

        fixed = fixed_from_template(infill, _Enc(), gap=gap, gap_length=gap_length, length=None)
        length = fixed.shape[1]
        if length > cfg.data.seq_len:
            raise ValueError(f"the infill template needs {length} tokens; the model takes at most {cfg.data.seq_len}")
    elif prompt or suffix:
        fixed = make_fixed(length, prefix=encode(prompt) if prompt else None, suffix=encode(suffix) if suffix else None)
    generator = torch.Generator(device=dev).manual_seed(seed)
    time_agnostic = not model.time_conditioning
    on_cuda = dev.type == "cuda"
    if compute == "auto":
        compute = "bf16-graph" if on_cuda else "fp32"
    if compute != "fp32" and not on_cuda:
        raise ValueError(f"--compute {compute} needs a CUDA device; use --compute fp32 on {dev}")
    denoiser = model.denoiser if compute == "fp32" else GraphDenoiser(
        model.network, num, length, dtype=torch.bfloat16, use_graph=compute == "bf16-graph")
    tokens = sample(
        denoiser, model.schedule, batch_size=num, length=length, vocab_size=model.vocab_size,
        num_steps=steps, grid=grid, generator=generator, sampler=sampler, temperature=temperature,
        top_k=top_k, top_p=top_p, precision=precision, cache=(cache and time_agnostic), time_agnostic=time_agnostic,
        fixed=fixed, device=dev, progress=progress,
    )
    settings = dict(run=str(run.path), step=run.step, weights=run.weights, steps=steps, grid=grid, sampler=sampler,
                    top_p=top_p, top_k=top_k, temperature=temperature, precision=precision, seed=seed, length=length,
                    prompt=prompt, suffix=suffix, infill=infill, gap_length=gap_length if infill else None,
                    compute=compute, cache=bool(cache and time_agnostic))
    return tokens.cpu(), settings, run


def generate_text(run_dir: str | Any, **kwargs: Any) -> tuple[list[str], dict[str, Any]]:
    """Sample texts from a text run folder (or a loaded run); returns (texts, settings).

    Keyword arguments are those of :func:`generate_tokens` (num, length, steps, grid, sampler,
    top_p, top_k, temperature, precision, prompt, suffix, infill, gap, gap_length, seed, cache,
    device, progress, compute).
    """
    tokens, settings, run = generate_tokens(run_dir, **kwargs)
    return [run.tokenizer.decode(row.tolist()) for row in tokens], settings


def generate_images(run: Any, *, num: int = 16, steps: int = 256, grid: str = "cosine", labels: Any = None,
                    guidance: float = 0.0, seed: int = 0, precision: str = "float64", temperature: float = 1.0,
                    top_p: float | None = None, record_every: int | None = None, device: str = "cpu",
                    progress: bool = True) -> tuple[Any, Any]:
    """Sample images (num, H·W·C) from a loaded image run; returns (tokens, SampleInfo)."""
    import torch

    from maskdiff.sampling import sample

    model = run.model
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=device)
    denoiser = model.guided_denoiser(y, guidance) if y is not None else model.denoiser
    time_agnostic = not model.time_conditioning
    return sample(
        denoiser, model.schedule, batch_size=num, length=model.network.seq_len, vocab_size=model.vocab_size,
        num_steps=steps, grid=grid, generator=torch.Generator(device=device).manual_seed(seed),
        temperature=temperature, top_p=top_p, precision=precision, cache=time_agnostic, time_agnostic=time_agnostic,
        device=device, progress=progress, return_info=True, record_every=record_every,
    )


def _sample_image_run(args: argparse.Namespace, run: Any, dev: Any) -> int:
    import torch

    from maskdiff.images import class_grid, save_grid, unmasking_strip

    net = run.model.network
    shape = tuple(net.config.image_shape)
    out = Path(args.out) if args.out else run.path / f"samples-{args.seed}.png"
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose another --out (files are never overwritten)")
    labels = None
    if args.per_class:
        if net.num_classes == 0:
            raise SystemExit("error: --per-class needs a class-conditional run (model.class_conditional=true)")
        labels = torch.arange(net.num_classes).repeat_interleave(args.per_class)
    elif args.label is not None:
        labels = torch.full((args.num,), args.label)
    num = len(labels) if labels is not None else args.num
    record = max(1, args.steps // 8) if args.strip else None
    with torch.no_grad():
        tokens, info = generate_images(run, num=num, steps=args.steps, grid=args.grid, labels=labels,
                                       guidance=args.guidance, seed=args.seed, precision=args.precision,
                                       temperature=args.temperature, top_p=args.top_p, record_every=record,
                                       device=dev)
    tokens = tokens.cpu()
    if args.per_class:
        class_grid(tokens, labels, shape, per_class=args.per_class, num_classes=net.num_classes, path=out,
                   vocab_size=run.model.vocab_size, scale=2)
    else:
        save_grid(tokens, shape, out, vocab_size=run.model.vocab_size, scale=2)
    print(f"wrote {num} samples to {out}", file=sys.stderr)
    if args.strip:
        strip = out.with_name(out.stem + "-strip.png")
        unmasking_strip(info.trajectory[:, :4].cpu(), shape, strip, final=tokens[:4], vocab_size=run.model.vocab_size)
        print(f"wrote the unmasking strip to {strip}", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from maskdiff.checkpoint import load

    dev = _device(args.device)
    run = load(args.run_dir, device=dev)
    if run.model.network.config.image_shape is not None:
        return _sample_image_run(args, run, dev)
    args.run_dir = run
    with _torch_no_grad():
        texts, settings = generate_text(
            args.run_dir, num=args.num, length=args.length, steps=args.steps, grid=args.grid, sampler=args.sampler,
            top_p=args.top_p, top_k=args.top_k, temperature=args.temperature, precision=args.precision,
            prompt=args.prompt, suffix=args.suffix, infill=args.infill, gap=args.gap, gap_length=args.gap_length,
            seed=args.seed, cache=not args.no_cache, device=args.device, compute=args.compute,
        )
    if args.out:
        out = Path(args.out)
        if out.exists():
            raise SystemExit(f"error: {out} exists; choose another --out (samples are never overwritten)")
        with open(out, "w") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"index": i, "text": text, **settings}) + "\n")
        print(f"wrote {len(texts)} samples to {out}", file=sys.stderr)
    else:
        for i, text in enumerate(texts):
            print(f"--- sample {i} ---\n{text}")
    return 0


def _torch_no_grad() -> Any:
    import torch

    return torch.no_grad()


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the demo preset (resuming or reusing runs/demo), evaluate it, and print samples."""
    from maskdiff.checkpoint import latest_checkpoint, write_json_atomic
    from maskdiff.config import apply_overrides, config_from_dict, get_preset
    from maskdiff.trainer import train

    out = Path(args.out)
    t_start = time.perf_counter()
    config = apply_overrides(get_preset("demo"), args.overrides)
    if (out / "config.json").is_file():
        saved = config_from_dict(json.loads((out / "config.json").read_text()))
        ckpt = latest_checkpoint(out)
        done = ckpt is not None and json.loads((ckpt / "state.json").read_text())["step"] >= saved.train.steps
        if saved.to_dict() != config.to_dict():
            raise SystemExit(f"error: {out} holds a run with another config; move it away or pass --out DIR")
        if done:
            print(f"{out} is already trained; evaluating it again (delete the folder to retrain)", file=sys.stderr)
        else:
            print(f"continuing the unfinished run in {out}", file=sys.stderr)
            train(config, out, resume=ckpt is not None, overwrite=ckpt is None)
    else:
        print(f"training the demo model (MD4, {config.model.n_layers} layers × {config.model.d_model}) on "
              f"character-level Wikipedia for {config.train.steps} steps; run folder {out}", file=sys.stderr)
        train(config, out)
    t_train = time.perf_counter() - t_start

    result = run_eval(str(out), split="test", batch_size=128, progress=True)
    results = {
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
    with _torch_no_grad():
        texts, settings = generate_text(str(out), num=3, steps=128, seed=0, progress=False)
        infilled, _ = generate_text(str(out), num=2, steps=128, seed=1, progress=False,
                                    infill="the history of ___ is the study of ___ in the past", gap_length=12)
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
    print("\ninfilling 'the history of ___ is the study of ___ in the past':")
    for text in infilled:
        print(f"  > {text}")
    print(f"\nresults in {out / 'results.json'}; total {time.perf_counter() - t_start:.0f} s")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from maskdiff.compare import compare_methods, format_table

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    summary = compare_methods(args.preset, methods=methods, overrides=args.overrides, out_dir=args.out,
                              eval_draws=args.draws, max_chunks=args.max_chunks)
    print(format_table(summary))
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    from maskdiff.config import PRESETS, get_preset

    for name in PRESETS:
        c = get_preset(name)
        print(f"{name:18s} {c.diffusion.method:6s} {c.data.corpus:14s} seq {c.data.seq_len:5d}  "
              f"{c.model.n_layers}×{c.model.d_model}  batch {c.train.batch_size}  steps {c.train.steps}")
    return 0


def _lazy(module: str, name: str) -> Any:
    """A handler imported only when its subcommand runs."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "demo": cmd_demo, "presets": cmd_presets,
                "compare": cmd_compare, "zeroshot": _lazy("maskdiff.zeroshot", "cmd_zeroshot"),
                "plot": _lazy("maskdiff.plots", "cmd_plot"), "genppl": _lazy("maskdiff.genppl", "cmd_genppl")}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Bad input: one clear line instead of a traceback (set MASKDIFF_DEBUG=1 for the traceback).
        if os.environ.get("MASKDIFF_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
