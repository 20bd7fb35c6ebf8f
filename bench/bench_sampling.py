"""Benchmark the sampler: samples per second and denoiser evaluations per sample, with and
without skipping denoiser calls (caching, lazy evaluation).

Default: T = 1000 steps, length 256, batch 4, on the CPU, with a small time-agnostic
``maskdiff.networks.Transformer`` (2 layers, width 64, V = 27; the output head gets small random
weights so that the prediction depends on z). Each configuration runs ``--repeats`` times with
the same seed; the median wall time is reported, and every configuration's samples are compared
with the baseline (they must be identical: skipping calls never changes the random stream).

Configurations (all exact):
  eager         the reference loop: one denoiser call per step
  cache         reuse the last output while no token changed (time-agnostic denoisers)
  cache-row     as cache, re-evaluating only the sequences that changed
  lazy          the library default: no call when no position can unmask in a step
  lazy+cache    both (not run by default: for a scalar schedule lazy already skips every call
                that caching would, so the two coincide)

Usage: python bench/bench_sampling.py [--batch-size 4] [--length 256] [--steps 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import maskdiff
from maskdiff.sampling import sample

CONFIGS: dict[str, dict[str, Any]] = {
    "eager": dict(lazy=False, cache=False),
    "cache": dict(lazy=False, cache=True),
    "cache-row": dict(lazy=False, cache=True, cache_scope="row"),
    "lazy": dict(lazy=True, cache=False),
    "lazy+cache": dict(lazy=True, cache=True),
}


def build_denoiser(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """A small time-agnostic transformer from maskdiff.network (random weights)."""
    from maskdiff.networks import Transformer, TransformerConfig

    cfg = TransformerConfig(
        vocab_size=args.vocab_size,
        seq_len=args.length,
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        time_conditioning=False,
    )
    torch.manual_seed(args.seed)  # model initialisation only; sampling uses its own generator
    model = Transformer(cfg).eval()
    with torch.no_grad():
        if model.head is not None:
            model.head.weight.normal_(0.0, 1.0 / args.d_model**0.5)
    params = sum(p.numel() for p in model.parameters())
    desc = (f"maskdiff.networks.Transformer(n_layers={args.layers}, d_model={args.d_model}, "
            f"n_heads={args.heads}, V={args.vocab_size}, time_conditioning=False), {params / 1e3:.0f}k params")
    return model, desc


def run(model: torch.nn.Module, args: argparse.Namespace, opts: dict[str, Any]) -> tuple[float, torch.Tensor, Any]:
    """One sampling run; returns (seconds, tokens, info)."""
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    tokens, info = sample(
        model, maskdiff.get_schedule(args.schedule), batch_size=args.batch_size, length=args.length,
        vocab_size=args.vocab_size, num_steps=args.steps, grid=args.grid, generator=gen, return_info=True, **opts,
    )
    return time.perf_counter() - start, tokens, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=27)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--schedule", default="linear")
    p.add_argument("--grid", default="cosine", choices=["cosine", "uniform"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--configs", default="eager,cache,cache-row,lazy",
                   help=f"comma-separated subset of {','.join(CONFIGS)} (the first is the baseline)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")

    model, desc = build_denoiser(args)
    print(f"denoiser: {desc}")
    print(f"T={args.steps} steps ({args.grid} grid, {args.schedule} schedule), length {args.length}, "
          f"batch {args.batch_size}, {args.repeats} repeats, {torch.get_num_threads()} threads, float64 ancestral")
    with torch.no_grad():
        run(model, argparse.Namespace(**{**vars(args), "steps": 4}), {})  # warm-up

    rows = []
    reference = None
    for name in names:
        times = []
        for _ in range(args.repeats):
            secs, tokens, info = run(model, args, CONFIGS[name])
            times.append(secs)
        med = statistics.median(times)
        if reference is None:
            reference = (name, tokens, med)
        same = torch.equal(tokens, reference[1])
        rows.append((name, args.batch_size / med, info.nfe_per_sample, info.denoiser_calls, reference[2] / med, same, med))

    print(f"\n{'config':<12} {'samples/s':>10} {'NFE/sample':>11} {'net calls':>10} {'speed-up':>9} "
          f"{'median s':>9}  same samples as {reference[0]}")
    for name, sps, nfe, calls, speedup, same, med in rows:
        print(f"{name:<12} {sps:>10.3f} {nfe:>11.1f} {calls:>10d} {speedup:>8.2f}x {med:>9.2f}  {'yes' if same else 'NO'}")
    return 0 if all(r[5] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
