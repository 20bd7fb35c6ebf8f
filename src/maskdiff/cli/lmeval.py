"""``maskdiff lm-eval``: a run folder on lm-evaluation-harness tasks (a thin wrapper around the harness).

The handler calls :func:`maskdiff.apps.lmeval.run_lm_eval` and prints the table; the harness and the
adapter are imported inside it, so ``maskdiff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["HANDLERS", "add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval", help="score a run on lm-evaluation-harness tasks, with Monte Carlo error bars",
        description="Run EleutherAI's lm-evaluation-harness on a run folder (pip install 'maskdiff[lmeval]'): "
                    "log-likelihoods from the negative ELBO with the context fixed (K draws and their Monte Carlo "
                    "standard error) or the exact left-to-right order, rolling perplexity, generation. Writes the "
                    "harness's results with the Monte Carlo summary to OUT/lmeval-<tasks>-<settings>.json "
                    "(never replacing a file). See docs/lm-eval.md.")
    p.add_argument("run_dir")
    p.add_argument("--tasks", required=True, help="comma-separated harness tasks, e.g. hellaswag,lambada_openai,wikitext")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    p.add_argument("--include-path", default=None, help="a folder of task YAML files (local tasks)")
    p.add_argument("--draws", type=int, default=4, help="K: Monte Carlo draws per request (the ELBO)")
    p.add_argument("--likelihood", default="elbo", choices=["elbo", "exact-order"],
                   help="elbo: the negative ELBO with the context fixed (a bound, K draws); exact-order: the exact "
                        "likelihood of left-to-right unmasking (one network row per token)")
    p.add_argument("--estimator", default="counts", choices=["counts", "times"],
                   help="MD4's ELBO: stratified mask counts (default) or the training loss's stratified times")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--normalize", default="text8", choices=["text8", "none"],
                   help="character runs: text8 maps text to a-z and space; none refuses other characters")
    p.add_argument("--sampler", default="ancestral", help="generate_until: the sampler (maskdiff.sampling.sampler_names())")
    p.add_argument("--sampler-option", dest="sampler_options", action="append", default=[], metavar="KEY=VALUE",
                   help="generate_until: an option of the sampler (repeatable; `maskdiff sample --sampler-option help`)")
    p.add_argument("--steps", type=int, default=None, help="generate_until: sampling steps (default one per new token)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="network rows per call")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"])
    p.add_argument("--out", default=None, help="folder for the result file (default RUN_DIR/lm-eval/)")
    p.add_argument("--no-greedy", action="store_true",
                   help="skip is_greedy (then always false): for tasks that do not read it (multiple choice, "
                        "perplexity); saves one network row per scored token of the ELBO")
    p.add_argument("--no-progress", action="store_true")


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from maskdiff.apps.lmeval.report import format_lmeval_table, run_lm_eval
    from maskdiff.cli.commands import _sampler_options

    tasks = [t.strip() for t in args.tasks.split(",")]
    path, kept = run_lm_eval(args.run_dir, tasks=tasks, limit=args.limit, include_path=args.include_path,
                             draws=args.draws, likelihood=args.likelihood, estimator=args.estimator, seed=args.seed,
                             batch_size=args.batch_size, device=args.device, weights=args.weights,
                             normalize=args.normalize, num_fewshot=args.num_fewshot, sampler=args.sampler,
                             sampler_options=_sampler_options(args.sampler_options) or None,
                             steps=args.steps, out=args.out, greedy=not args.no_greedy, progress=not args.no_progress)
    print(format_lmeval_table(kept))
    print(f"results in {path}", file=sys.stderr)
    return 0


HANDLERS = {"lm-eval": cmd_lm_eval}
