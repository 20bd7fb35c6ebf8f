"""Training-throughput benchmark: the fast path next to a naive eager reference, in one run.

For each model shape, batch size and *variant* it runs full MD4 training steps as the trainer
does (``MaskedDiffusion`` forward with the linear schedule, backward, gradient clipping, AdamW,
fused on CUDA) on random tokens and prints

* ms/step     median over the timed steps (after ``--warmup`` untimed ones);
* tokens/s    batch * seq_len / median step time, and the ratio to the first variant's;
* MFU         ``Transformer.flops_per_token(seq_len) * tokens/s / peak`` (``--peak-tflops``;
              989 = H100/H200 dense bf16 by default on CUDA with bf16, unknown otherwise);
* peak mem    ``torch.cuda.max_memory_allocated`` on CUDA (reset per row); on the CPU the
              process's peak resident set size (``ru_maxrss``), which only grows across rows.

Variants (same model, same data, same random draws):

  eager     the naive reference: full (B, L, V) logits, then cross-entropy at masked positions
  chunked   output head applied to the masked positions only, chunked (maskdiff.cross_entropy)
  fast      chunked + ``torch.compile`` of the network (the recommended GPU configuration)

Before timing, the first step's loss of every variant is compared with the eager one on the
same batch and generator ("Δloss"): within float rounding (fp32) or bf16 tolerance.

Examples::

    python bench/bench_train.py                                   # auto device and defaults
    python bench/bench_train.py --device cuda --shapes md4-s --batch-sizes 8,16,32,64
    python bench/bench_train.py --device cpu --shapes small --batch-sizes 2 --variants eager,chunked
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import statistics
import sys
import time
from typing import Any

import torch

from maskdiff import get_schedule
from maskdiff.devices import resolve_device
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import MODEL_PRESETS, Transformer, model_preset

H100_BF16_DENSE_TFLOPS = 989.0
VARIANTS = ("eager", "chunked", "fast")
# Defaults on CPU keep the whole run to a few minutes on two cores.
CPU_DEFAULT_BATCH = {"tiny": 8, "small": 2, "md4-s": 1, "md4-m": 1}
CPU_DEFAULT_STEPS = 2
CPU_DEFAULT_VARIANTS = "eager,chunked"
CUDA_DEFAULT_BATCHES = [8, 16, 32, 64]
CUDA_DEFAULT_STEPS = 10
CUDA_DEFAULT_VARIANTS = "eager,fast"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shapes", default=None, help=f"comma list from {sorted(MODEL_PRESETS)} "
                        "(default: cuda md4-s; cpu small,md4-s)")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma list of batch sizes (default: cuda 8,16,32,64; cpu 2 for small, 1 for md4-s)")
    parser.add_argument("--variants", default=None,
                        help=f"comma list from {VARIANTS}; the first is the baseline of the ratios "
                             f"(default: cuda {CUDA_DEFAULT_VARIANTS}; cpu {CPU_DEFAULT_VARIANTS})")
    parser.add_argument("--seq-len", type=int, default=None, help="override the shapes' sequence length")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps (default: cuda {CUDA_DEFAULT_STEPS}, cpu {CPU_DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: cuda 3, cpu 1)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                        help="bf16 = bf16 autocast (CUDA only; the CPU always runs fp32); fp32 on CUDA uses TF32")
    parser.add_argument("--time-conditioning", action=argparse.BooleanOptionalAction, default=True,
                        help="adaLN-zero time conditioning (default on)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: 989 on CUDA with bf16)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def build(shape: str, variant: str, args: argparse.Namespace, device: torch.device) -> MaskedDiffusion:
    """The same initial model for every variant (seeded), as the trainer builds it."""
    overrides: dict[str, Any] = {"time_conditioning": args.time_conditioning}
    if args.seq_len is not None:
        overrides["seq_len"] = args.seq_len
    torch.manual_seed(args.seed)
    network = Transformer(model_preset(shape, **overrides))
    with torch.no_grad():  # the zero-initialised head would make every variant's first loss log V
        network.head.weight.normal_(0.0, 0.02)
    model = MaskedDiffusion(network, get_schedule("linear"), "md4", chunked_loss=variant != "eager").to(device)
    if variant == "fast":
        model.network.compile()
    return model.train()


def autocast_for(device: torch.device, args: argparse.Namespace) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and args.dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def first_loss(model: MaskedDiffusion, x: torch.Tensor, args: argparse.Namespace, device: torch.device) -> float:
    """The loss of the first training step (same batch, same generator seed for every variant)."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    with torch.no_grad(), autocast_for(device, args):
        return float(model(x, generator=gen)["loss"])


def bench_one(shape: str, batch: int, variant: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time ``args.steps`` training steps of one shape, batch size and variant."""
    model = build(shape, variant, args, device)
    config = model.network.config
    flops_per_token = model.network.flops_per_token(config.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=device.type == "cuda")
    x = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device,
                      generator=torch.Generator(device=device).manual_seed(args.seed))
    loss0 = first_loss(model, x, args, device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)

    def step() -> float:
        with autocast_for(device, args):
            loss = model(x, generator=gen)["loss"]  # nats per token
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # also synchronises the device

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    loss = float("nan")
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_s = batch * config.seq_len / seconds
    mfu = flops_per_token * tokens_per_s / (args.peak_tflops * 1e12) if args.peak_tflops else None
    return {
        "shape": shape, "variant": variant, "params_M": model.network.num_parameters() / 1e6, "batch": batch,
        "seq_len": config.seq_len, "ms_per_step": 1e3 * seconds, "tokens_per_s": tokens_per_s, "mfu": mfu,
        "peak_mem_GiB": peak_memory_gib(device), "first_loss": loss0, "last_loss": loss,
    }


HEADER = (f"{'shape':>7} {'variant':>8} {'batch':>5} {'seq':>5} {'paramsM':>8} {'ms/step':>9} {'tokens/s':>10} "
          f"{'×base':>6} {'MFU':>7} {'mem GiB':>8} {'Δloss':>9}")


def format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['shape']:>7} {r['variant']:>8} {r['batch']:>5}  {r['error']}"
    mfu = f"{100 * r['mfu']:6.1f}%" if r["mfu"] is not None else "    n/a"
    ratio = f"{r['speedup']:6.2f}" if r.get("speedup") is not None else "     -"
    dloss = f"{r['delta_first_loss']:9.2e}" if r.get("delta_first_loss") is not None else "        -"
    return (f"{r['shape']:>7} {r['variant']:>8} {r['batch']:>5} {r['seq_len']:>5} {r['params_M']:>8.1f} "
            f"{r['ms_per_step']:>9.1f} {r['tokens_per_s']:>10.0f} {ratio} {mfu} {r['peak_mem_GiB']:>8.2f} {dloss}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (CUDA_DEFAULT_STEPS if cuda else CPU_DEFAULT_STEPS)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.peak_tflops is None and cuda and args.dtype == "bf16":
        args.peak_tflops = H100_BF16_DENSE_TFLOPS
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    shapes = [s.strip() for s in (args.shapes or ("md4-s" if cuda else "small,md4-s")).split(",") if s.strip()]
    unknown = [s for s in shapes if s not in MODEL_PRESETS]
    if unknown:
        sys.exit(f"unknown shape(s) {unknown}; choose from {sorted(MODEL_PRESETS)}")
    variants = [v.strip() for v in (args.variants or (CUDA_DEFAULT_VARIANTS if cuda else CPU_DEFAULT_VARIANTS)).split(",")]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        sys.exit(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    explicit_batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None

    where = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    dtype = "bf16 autocast" if cuda and args.dtype == "bf16" else "fp32"
    print(f"torch {torch.__version__} on {where}; {dtype}; time conditioning {args.time_conditioning}")
    print(f"steps: {args.warmup} warm-up + {args.steps} timed (median); peak TFLOP/s for MFU: {args.peak_tflops or 'n/a'}")
    print(f"variants: {', '.join(variants)} (×base and Δloss against {variants[0]})")
    print(HEADER)
    results = []
    for shape in shapes:
        for batch in explicit_batches or (CUDA_DEFAULT_BATCHES if cuda else [CPU_DEFAULT_BATCH.get(shape, 1)]):
            base: dict[str, Any] | None = None
            for variant in variants:
                try:
                    row = bench_one(shape, batch, variant, args, device)
                except torch.cuda.OutOfMemoryError:
                    row = {"shape": shape, "variant": variant, "batch": batch, "error": "out of memory"}
                if "error" not in row and base is not None and "error" not in base:
                    row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
                    row["delta_first_loss"] = abs(row["first_loss"] - base["first_loss"])
                if base is None:
                    base = row
                print(format_row(row), flush=True)
                results.append(row)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "dtype": dtype, "torch": torch.__version__, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
