"""Training-throughput benchmark for the masked-diffusion denoiser (maskdiff.network).

For each model shape and batch size it runs full training steps (MD4 loss, backward, gradient
clipping, AdamW) on random tokens and prints

* ms/step     median over the timed steps (after ``--warmup`` untimed ones);
* tokens/s    batch * seq_len / median step time;
* MFU         model FLOPs utilisation, ``Transformer.flops_per_token(seq_len) * tokens/s / peak``,
              where the peak is known (``--peak-tflops``; 989 = H100/H200 dense bf16 by default
              on CUDA with bf16, unknown otherwise);
* peak mem    ``torch.cuda.max_memory_allocated`` on CUDA (reset per row); on CPU the process's
              peak resident set size (``ru_maxrss``), which only ever grows across rows.

Examples::

    python bench/bench_train.py                                   # auto device, small + md4-s
    python bench/bench_train.py --device cuda --shapes md4-s --batch-sizes 8,16,32 --compile
    python bench/bench_train.py --device cpu --shapes small --batch-sizes 4 --steps 5 --dtype fp32

The loss is ``maskdiff.losses.md4_nelbo`` with the linear schedule (nats per sequence, divided
by the sequence length for the backward pass). If that module is missing, a local stand-in with
the same cost profile is used: t ~ U(0, 1) per sequence, each token masked with probability t,
cross-entropy on masked positions weighted by 1/t.
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
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from maskdiff import get_schedule
from maskdiff.network import MODEL_PRESETS, Transformer, model_preset

LossFn = Callable[[Transformer, Tensor], Tensor]

H100_BF16_DENSE_TFLOPS = 989.0
# Defaults on CPU keep the whole run under about two minutes on two cores.
CPU_DEFAULT_BATCH = {"tiny": 8, "small": 2, "md4-s": 1, "md4-m": 1}
CPU_DEFAULT_STEPS = 2
CUDA_DEFAULT_BATCHES = [8, 32]
CUDA_DEFAULT_STEPS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shapes", default="small,md4-s", help=f"comma list from {sorted(MODEL_PRESETS)}")
    parser.add_argument(
        "--batch-sizes",
        default=None,
        help="comma list of batch sizes, each run for every shape (default: cuda 8,32; cpu 2 for "
        "small and 1 for md4-s)",
    )
    parser.add_argument("--seq-len", type=int, default=None, help="override the shapes' sequence length")
    parser.add_argument(
        "--steps", type=int, default=None,
        help=f"timed steps (default: cuda {CUDA_DEFAULT_STEPS}, cpu {CPU_DEFAULT_STEPS})",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: cuda 3, cpu 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp32"],
        help="bf16 = bf16 autocast (CUDA only; CPU always runs fp32); fp32 on CUDA uses TF32 matmuls",
    )
    parser.add_argument("--no-time-conditioning", action="store_true", help="time-agnostic model variant")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: 989 on CUDA with bf16)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    return torch.device(name)


def fallback_nelbo(model: Transformer, x: Tensor) -> Tensor:
    """Stand-in for md4_nelbo (linear schedule, no boundary terms): nats per sequence, (B,)."""
    B, L = x.shape
    t = torch.rand(B, device=x.device).clamp_min(1e-4)  # (B,)
    masked = torch.rand(B, L, device=x.device) < t[:, None]  # (B, L)
    z = torch.where(masked, model.mask_id, x)  # (B, L)
    logits = model(z, t)  # (B, L, V)
    ce = F.cross_entropy(logits[masked].float(), x[masked], reduction="none")  # (N,) masked positions only
    rows = masked.nonzero()[:, 0]  # (N,) sequence of each masked position
    per_sequence = torch.zeros(B, device=x.device).index_add_(0, rows, ce)  # (B,)
    return per_sequence / t


def make_loss_fn() -> tuple[LossFn, str]:
    """The MD4 objective from maskdiff.losses when available, else the local stand-in."""
    try:
        from maskdiff.losses import md4_nelbo
    except ImportError:
        return fallback_nelbo, "local fallback (maskdiff.losses not found)"
    schedule = get_schedule("linear")
    return (lambda model, x: md4_nelbo(model, x, schedule)), "maskdiff.losses.md4_nelbo (linear schedule)"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def bench_one(
    shape: str, batch: int, args: argparse.Namespace, device: torch.device, loss_fn: LossFn
) -> dict[str, Any]:
    """Time ``args.steps`` training steps of one shape and batch size."""
    overrides: dict[str, Any] = {}
    if args.seq_len is not None:
        overrides["seq_len"] = args.seq_len
    if args.no_time_conditioning:
        overrides["time_conditioning"] = False
    config = model_preset(shape, **overrides)
    torch.manual_seed(args.seed)
    model = Transformer(config).to(device).train()
    flops_per_token = model.flops_per_token(config.seq_len)
    n_params = model.num_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=device.type == "cuda")
    net = torch.compile(model) if args.compile else model
    x = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)
    use_bf16 = device.type == "cuda" and args.dtype == "bf16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            loss = loss_fn(net, x).mean() / config.seq_len  # nats per token
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # also synchronises the device

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
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
        "shape": shape,
        "params_M": n_params / 1e6,
        "batch": batch,
        "seq_len": config.seq_len,
        "ms_per_step": 1e3 * seconds,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_mem_GiB": peak_memory_gib(device),
        "last_loss": loss,
    }


def format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['shape']:>7} {r['batch']:>5}  {r['error']}"
    mfu = f"{100 * r['mfu']:6.1f}%" if r["mfu"] is not None else "    n/a"
    return (
        f"{r['shape']:>7} {r['batch']:>5} {r['seq_len']:>6} {r['params_M']:>8.1f} {r['ms_per_step']:>10.1f} "
        f"{r['tokens_per_s']:>11.0f} {mfu} {r['peak_mem_GiB']:>9.2f} {r['last_loss']:>8.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if args.steps is None:
        args.steps = CUDA_DEFAULT_STEPS if cuda else CPU_DEFAULT_STEPS
    if args.warmup is None:
        args.warmup = 3 if cuda else 1
    if args.peak_tflops is None and cuda and args.dtype == "bf16":
        args.peak_tflops = H100_BF16_DENSE_TFLOPS
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in MODEL_PRESETS]
    if unknown:
        sys.exit(f"unknown shape(s) {unknown}; choose from {sorted(MODEL_PRESETS)}")
    explicit_batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None

    loss_fn, loss_name = make_loss_fn()
    where = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    dtype = "bf16 autocast" if cuda and args.dtype == "bf16" else "fp32"
    print(f"torch {torch.__version__} on {where}; {dtype}; compile={args.compile}; loss: {loss_name}")
    peak = args.peak_tflops or "n/a"
    print(f"steps: {args.warmup} warm-up + {args.steps} timed (median); peak TFLOPS for MFU: {peak}")
    mem_label = "peakGiB" if cuda else "maxRSSGiB"
    print(
        f"{'shape':>7} {'batch':>5} {'seq':>6} {'paramsM':>8} {'ms/step':>10} {'tokens/s':>11} {'MFU':>7} "
        f"{mem_label:>9} {'loss':>8}"
    )

    results = []
    for shape in shapes:
        batches = explicit_batches or (CUDA_DEFAULT_BATCHES if cuda else [CPU_DEFAULT_BATCH.get(shape, 1)])
        for batch in batches:
            try:
                row = bench_one(shape, batch, args, device, loss_fn)
            except torch.cuda.OutOfMemoryError:
                row = {"shape": shape, "batch": batch, "error": "out of memory"}
            print(format_row(row), flush=True)
            results.append(row)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            summary = {"device": where, "dtype": dtype, "compile": args.compile, "results": results}
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
