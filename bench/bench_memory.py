"""Peak memory at GPT-2's vocabulary: the chunked/streamed paths next to the unchunked ones, in one run.

Cases (V = 50,257 by default; every size is a flag):

  genmd4-loss      GenMD4 training step (forward + backward of ``MaskedDiffusion``) on a small
                   transformer: ``chunked_loss=False`` (full (2B, L, V) logits, the 0.1 path)
                   against the chunked head path (``maskdiff.cross_entropy.linear_genmd4_terms``).
  step-f32         one float32 ancestral step over N = B·L masked positions, scalar schedule
                   (random logits, top-p 0.95, r = 0.5): one chunk of (N, V + 1) buffers
                   (``DRAW_CHUNK_ELEMENTS`` set huge, the 0.1 path) against the default chunks.
  step-f32-token   the same with a per-token (GenMD4) schedule (adds an (N, V) float64 rate).
  step-f64         the default float64 ancestral step, scalar schedule, a step with r = 0.5
                   (about half the positions need μ).
  step-f64-token   the float64 ancestral step with a per-token schedule, t = 1 → 0.3 (nearly
                   every position is a candidate).
  sample-token     ``sample()`` with a per-token schedule, T steps: the (T + 1, V) float64 α
                   table (``PER_TOKEN_ALPHA_TABLE = True``, the 0.1 path) against α computed in
                   blocks of ``ALPHA_BLOCK_ELEMENTS`` // V grid times.

Each (case, path) runs in a fresh process; inputs (the model, the logits a step receives) are
allocated before the measured call. Two measures of what the call adds:

* tensors: the peak of live tensor memory that torch's allocator handed out during the call. On
  CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before; on the CPU the peak
  of the running sum of the allocator's allocations and frees, from the profiler's memory events
  (``torch.profiler.profile(profile_memory=True)``; the call is repeated under the profiler).
  Python's tracemalloc would not see them: torch's CPU allocator bypasses Python's.
* resident (CPU only): the peak resident set size above the resident size before the call,
  ``VmHWM`` in /proc/self/status after resetting it through ``/proc/self/clear_refs`` (Linux). It
  includes what glibc's malloc keeps after frees, so it exceeds the tensor peak.

The old and new paths must give the same results: the table's last column compares them (loss
terms and gradients up to float rounding; sampled tokens exactly).

Examples::

    python bench/bench_memory.py                      # every case, CPU-sized defaults
    python bench/bench_memory.py --cases step-f32 --batch 8 --length 1024
    python bench/bench_memory.py --device cuda --batch 32 --length 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = ("genmd4-loss", "step-f32", "step-f32-token", "step-f64", "step-f64-token", "sample-token")
GPT2_VOCAB = 50257
MIB = 2.0**20


# ---------------------------------------------------------------------------------------------
# Measuring one call in this process


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _live_peak(events) -> int:
    """Peak of the running sum of the allocator's allocations (+) and frees (-), in bytes."""
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for e in memory:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def measure(fn, device: torch.device) -> tuple[object, float, float, float]:
    """Run ``fn()``; return (its result, peak MiB of tensors it allocated, peak MiB of resident
    memory it added (CPU) or None, seconds). The call runs twice: once under the profiler (tensor
    memory), once without it (resident memory and time)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / MIB, float("nan"), time.perf_counter() - start
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    resident = (_status_kib("VmHWM") - base) / 1024.0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return out, _live_peak(prof.profiler.kineto_results.events()) / MIB, resident, seconds


# ---------------------------------------------------------------------------------------------
# The cases: (set-up, the call to measure, a summary of its result for the comparison)


def _per_token_schedule(vocab: int, device: torch.device):
    from maskdiff.schedules import GenMD4Schedule

    sched = GenMD4Schedule(vocab)
    with torch.no_grad():
        sched.phi.add_(torch.randn(vocab, generator=torch.Generator().manual_seed(0)))
    return sched.to(device)


def case_genmd4_loss(args, old: bool, device: torch.device):
    from maskdiff.model import MaskedDiffusion
    from maskdiff.networks import Transformer, TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=args.vocab, seq_len=args.length, n_layers=1, d_model=args.d_model,
                            n_heads=2, time_conditioning=True)
    net = Transformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # a non-zero head, so the loss is not uniform
    model = MaskedDiffusion(net, _per_token_schedule(args.vocab, torch.device("cpu")), "genmd4",
                            chunked_loss=not old).to(device).train()
    x = torch.randint(0, args.vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(1)).to(device)

    def call():
        model.zero_grad(set_to_none=True)
        terms = model(x, generator=torch.Generator(device=device).manual_seed(2))
        terms["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return {"nelbo": terms["nelbo"].detach().cpu().tolist(), "grads": grads.cpu()}

    return call


def _step_alphas(per_token: bool, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """α at t and s for one large step (t = 1 → s = 0.3): nearly every position is a candidate."""
    from maskdiff.sampling import vocab_alpha

    if not per_token:
        return (torch.tensor([[0.2]], dtype=torch.float64, device=device),
                torch.tensor([[0.6]], dtype=torch.float64, device=device))
    sched = _per_token_schedule(vocab, device).double()
    return tuple(vocab_alpha(sched, torch.tensor([t], dtype=torch.float64, device=device), vocab) for t in (1.0, 0.3))


def _step_call(args, old: bool, device: torch.device, precision: str, per_token: bool):
    import maskdiff.sampling.categorical as categorical
    from maskdiff.sampling import ancestral_step

    if old:
        categorical.DRAW_CHUNK_ELEMENTS = 2**62  # one chunk: the unchunked (0.1) buffers
    v, b, length = args.vocab, args.batch, args.length
    logits = torch.randn(b, length, v, generator=torch.Generator().manual_seed(3)).to(device)
    z = torch.full((b, length), v, device=device)
    a_t, a_s = _step_alphas(per_token, v, device)

    def call():
        return ancestral_step(z, logits, a_t, a_s, generator=torch.Generator(device=device).manual_seed(4),
                              precision=precision, top_p=0.95).cpu()

    return call


def case_sample_token(args, old: bool, device: torch.device):
    import maskdiff.sampling.sampler as sampler_module
    from maskdiff.sampling import sample

    sampler_module.PER_TOKEN_ALPHA_TABLE = old
    v = args.vocab
    sched = _per_token_schedule(v, device)
    logits = torch.randn(args.sample_length, v, generator=torch.Generator().manual_seed(5)).to(device)

    def denoiser(z, t):
        return logits.expand(z.shape[0], -1, -1)

    def call():
        return sample(denoiser, sched, batch_size=1, length=args.sample_length, vocab_size=v, num_steps=args.steps,
                      generator=torch.Generator(device=device).manual_seed(6), device=device).cpu()

    return call


def build(case: str, args, old: bool, device: torch.device):
    if case == "genmd4-loss":
        return case_genmd4_loss(args, old, device)
    if case == "sample-token":
        return case_sample_token(args, old, device)
    precision = "float32" if case.startswith("step-f32") else "float64"
    return _step_call(args, old, device, precision, per_token=case.endswith("-token"))


def child(case: str, path: str, args) -> None:
    """Measure one (case, path) in this fresh process and print one JSON line."""
    device = torch.device(args.device)
    call = build(case, args, path == "old", device)
    out, tensors, resident, seconds = measure(call, device)
    torch.save(out, args.result)
    print(json.dumps({"case": case, "path": path, "tensors_mib": tensors, "resident_mib": resident, "seconds": seconds}))


# ---------------------------------------------------------------------------------------------
# The parent: one process per row, then the table


def compare(old, new) -> str:
    """How the new path's result compares with the old one's."""
    if isinstance(old, torch.Tensor):
        return "tokens identical" if torch.equal(old, new) else f"tokens DIFFER ({int((old != new).sum())})"
    loss = max(abs(a - b) / abs(a) for a, b in zip(old["nelbo"], new["nelbo"]))
    rel = float((old["grads"] - new["grads"]).norm() / old["grads"].norm())
    return f"nelbo within {loss:.0e}, gradients within {rel:.0e} (relative)"


def describe(case: str, args) -> str:
    n = args.batch * args.length
    if case == "genmd4-loss":
        return f"GenMD4 step, B × L = {args.batch} × {args.length} (2 copies), d = {args.d_model}"
    if case == "sample-token":
        return f"sample(), GenMD4 schedule, T = {args.steps}, 1 × {args.sample_length}"
    return f"{case}: {n} masked positions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000, help="sample-token: T")
    parser.add_argument("--sample-length", type=int, default=8, help="sample-token: L")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args)
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("cases", "child", "result")]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {args.device}, V = {args.vocab}\n")
    print("| case | tensors, old path (MiB) | tensors, new path (MiB) | old / new | resident, old | resident, new "
          "| old s | new s | same values |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        rows, results = {}, {}
        for path in ("old", "new"):
            result = Path(f"/tmp/bench_memory_{case}_{path}.pt")
            cmd = [sys.executable, __file__, "--child", case, path, f"--result={result}", *forwarded]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[path] = json.loads(out.strip().splitlines()[-1])
            results[path] = torch.load(result)
            result.unlink()
        old, new = rows["old"], rows["new"]
        print(f"| {describe(case, args)} | {old['tensors_mib']:.0f} | {new['tensors_mib']:.0f} | "
              f"{old['tensors_mib'] / max(new['tensors_mib'], 1e-9):.1f} | {old['resident_mib']:.0f} | "
              f"{new['resident_mib']:.0f} | {old['seconds']:.2f} | {new['seconds']:.2f} | "
              f"{compare(results['old'], results['new'])} |", flush=True)


if __name__ == "__main__":
    main()
