"""Sampling-step benchmark at a model shape (default MD4-S, 1,024 tokens): the fast denoiser
(bf16, CUDA graph) next to the naive eager reference of the same model, in one run.

Prints, for each batch size (default 1 and 32):

* ms per denoiser call: eager fp32 (the reference), eager bf16 autocast, bf16 CUDA graph
  (``maskdiff.sampling.cuda_graph.GraphDenoiser``), median of ``--calls`` calls;
* ms per full ancestral step (denoiser + float64 draws) with the fast denoiser;
* a whole ``--steps``-step sample (default 1,000) with and without caching (lazy evaluation
  off, so "no cache" is the plain loop with one call per step), for a time-agnostic model
  (wall time, denoiser calls, tokens/s) — at batch 32 only ``--steps-b32`` steps are run
  (default 100) and the per-step figure is reported;
* agreement: max |Δlogit| of the fast path against fp32 eager, and the fraction of tokens on
  which samples drawn with the same seed through the fp32 and the fast denoiser agree.

The network has random weights (N(0, 0.02) head): the cost of a call does not depend on the
weights, and the sampler's work per step depends only on the schedule and the number of masks.

Usage: python bench/bench_sampling_step.py [--shape md4-s] [--batch-sizes 1,32] [--steps 1000]
On the CPU the default shape is ``small`` (6 layers, width 384, 256 tokens) and CUDA graphs are
not available, so only the eager rows are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from maskdiff import get_schedule
from maskdiff.networks import Transformer, model_preset
from maskdiff.sampling import sample
from maskdiff.sampling.cuda_graph import GraphDenoiser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--shape", default=None, help="model preset (default: cuda md4-s, cpu small)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default: cuda 1,32; cpu 1)")
    p.add_argument("--calls", type=int, default=None, help="timed denoiser calls (default: cuda 50, cpu 3)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps of the batch-1 sample (default: cuda 1000, cpu 20)")
    p.add_argument("--steps-b32", type=int, default=100, help="sampling steps for batches > 1 (default 100)")
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], n: int, device: torch.device, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def timed_sample(denoiser: Any, batch: int, length: int, vocab: int, steps: int, device: torch.device,
                 cache: bool) -> tuple[float, Any, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    tokens, info = sample(denoiser, get_schedule("linear"), batch_size=batch, length=length, vocab_size=vocab,
                          num_steps=steps, generator=torch.Generator(device=device).manual_seed(7), device=device,
                          cache=cache, lazy=False, return_info=True, progress=False)
    sync(device)
    return time.perf_counter() - start, info, tokens


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    shape = args.shape or ("md4-s" if cuda else "small")
    batches = [int(b) for b in (args.batch_sizes or ("1,32" if cuda else "1")).split(",")]
    calls = args.calls or (50 if cuda else 3)
    steps = args.steps or (1000 if cuda else 20)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is true fp32

    torch.manual_seed(args.seed)
    net = Transformer(model_preset(shape, time_conditioning=False)).to(device).eval()
    with torch.no_grad():
        net.head.weight.normal_(0.0, 0.02)
    cfg = net.config
    length, vocab = cfg.seq_len, cfg.vocab_size
    where = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__} on {where}; shape {shape}: {cfg.n_layers} layers, width {cfg.d_model}, "
          f"{length} tokens, V={vocab}, {net.num_parameters() / 1e6:.1f}M parameters (time-agnostic)")

    out: dict[str, Any] = {"device": where, "torch": torch.__version__, "shape": shape, "rows": []}
    for batch in batches:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        z = torch.randint(0, vocab + 1, (batch, length), device=device, generator=gen)  # ~1/V masks... mixed below
        z[torch.rand(batch, length, device=device, generator=gen) < 0.5] = vocab  # half masked
        t = torch.full((batch,), 0.5, device=device)
        fp32 = GraphDenoiser(net, batch, length, dtype=torch.float32, use_graph=False)
        row: dict[str, Any] = {"batch": batch}
        row["eager_fp32_ms"] = median_ms(lambda: fp32(z, t), calls, device)
        fast = None
        if cuda:
            bf16 = GraphDenoiser(net, batch, length, use_graph=False)
            fast = GraphDenoiser(net, batch, length)
            row["eager_bf16_ms"] = median_ms(lambda: bf16(z, t), calls, device)
            row["graph_bf16_ms"] = median_ms(lambda: fast(z, t), calls, device)
            ref = fp32(z, t)
            row["max_abs_dlogit"] = float((fast(z, t) - ref).abs().max())
            row["ref_logit_std"] = float(ref.std())
        denoiser = fast if fast is not None else fp32
        n_steps = steps if batch == 1 else min(steps, args.steps_b32)
        wall_nc, info_nc, tok_fast = timed_sample(denoiser, batch, length, vocab, n_steps, device, cache=False)
        wall_c, info_c, tok_cache = timed_sample(denoiser, batch, length, vocab, n_steps, device, cache=True)
        row.update({
            "sample_steps": n_steps,
            "sample_s_nocache": wall_nc, "calls_nocache": info_nc.denoiser_calls,
            "sample_s_cache": wall_c, "calls_cache": info_c.denoiser_calls,
            "ms_per_step_nocache": 1e3 * wall_nc / n_steps,
            "tokens_per_s_nocache": batch * length / wall_nc,
            "tokens_per_s_cache": batch * length / wall_c,
            "cache_identical": bool(torch.equal(tok_fast, tok_cache)),
        })
        if fast is not None:
            _, _, tok_ref = timed_sample(fp32, batch, length, vocab, n_steps, device, cache=True)
            row["token_agreement_vs_fp32"] = float((tok_ref == tok_fast).float().mean())
        out["rows"].append(row)
        print(f"\nbatch {batch}:")
        print(f"  denoiser call  eager fp32 {row['eager_fp32_ms']:8.2f} ms", end="")
        if cuda:
            print(f" | eager bf16 {row['eager_bf16_ms']:7.2f} ms | bf16 CUDA graph {row['graph_bf16_ms']:7.2f} ms "
                  f"({row['eager_fp32_ms'] / row['graph_bf16_ms']:.1f}× fp32, "
                  f"{row['eager_bf16_ms'] / row['graph_bf16_ms']:.1f}× eager bf16)")
            print(f"  fast vs fp32   max |Δlogit| {row['max_abs_dlogit']:.3g} (logit std {row['ref_logit_std']:.3g}); "
                  f"same-seed samples agree on {100 * row['token_agreement_vs_fp32']:.1f}% of tokens")
        else:
            print()
        print(f"  {n_steps}-step sample, no cache: {wall_nc:8.2f} s ({row['ms_per_step_nocache']:.2f} ms/step incl. "
              f"draws, {info_nc.denoiser_calls} calls, {row['tokens_per_s_nocache']:.0f} tokens/s)")
        print(f"  {n_steps}-step sample, cache   : {wall_c:8.2f} s ({info_c.denoiser_calls} calls, "
              f"{row['tokens_per_s_cache']:.0f} tokens/s; identical to no-cache: {row['cache_identical']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
