"""AR, MD4 and GenMD4 runs of one budget through lm-evaluation-harness on held-out Wikipedia tasks.

For each run folder RUNS/<method> (read only; everything is written under OUT/<method>/):

1. ``maskdiff lm-eval RUN --tasks wiki_cloze,wiki_rolling --include-path TASKS --draws K --no-greedy``
   (the negative ELBO with the context fixed; the AR baseline's exact likelihood);
2. for MD4 and GenMD4 also ``--likelihood exact-order --tasks wiki_cloze`` (the left-to-right order;
   exact and deterministic, so a result already in OUT/<method>/ is read instead);
3. ``maskdiff eval RUN --split test --max-chunks N --draws 2 --out OUT/<method>/eval-test-nN-K2.json``
   on the chunks that ``wiki_rolling``'s documents cover (N = documents × characters / seq_len),

and, for MD4, the Monte Carlo errors of the two ELBO estimators (stratified mask counts, the
default, and the training loss's stratified times) on the first cloze items at the same K; then
prints a Markdown table: cloze accuracy with its 95% interval (acc ± 1.96 × the harness's
standard error over items), the fraction of items whose ranking could flip within 2 Monte Carlo
standard errors, the rolling bits per character and word perplexity, and the difference between the
harness's rolling NELBO and ``maskdiff eval``'s on the same text, in units of their combined Monte
Carlo error. Build TASKS first with ``bench/build_cloze.py``.

    OMP_NUM_THREADS=1 nice -n 10 python bench/lmeval_compare.py --runs runs/shared-compare \\
        --tasks runs/lmeval/tasks --out runs/lmeval/compare
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from maskdiff.apps.likelihood import run_eval
from maskdiff.apps.lmeval import ESTIMATORS, LikelihoodEstimator, TextCodec, pair_windows
from maskdiff.apps.lmeval.report import run_lm_eval
from maskdiff.metrics import Z95
from maskdiff.runs import load, read_run_config


def evaluate(run: Path, tasks: Path, out: Path, draws: int, eval_draws: int, exact: bool) -> dict:
    """The three evaluations of one run (see the module docs); returns the numbers of the table."""
    method = read_run_config(run).diffusion.method
    t0 = time.perf_counter()
    path, elbo = run_lm_eval(run, tasks=["wiki_cloze", "wiki_rolling"], include_path=str(tasks), draws=draws,
                             out=out, greedy=False)
    row = {"method": method, "file": str(path)}
    cloze, rolling = elbo["results"]["wiki_cloze"], elbo["results"]["wiki_rolling"]
    mc = elbo["maskdiff"]["mc"]
    row.update(acc=cloze["acc,none"], acc_se=cloze["acc_stderr,none"], items=mc["wiki_cloze"]["items"],
               flip=mc["wiki_cloze"]["flip_fraction"], bpc=rolling["bits_per_byte,none"],
               bpc_mc=mc["wiki_rolling"]["mc_stderr_bits_per_byte"], word_ppl=rolling["word_perplexity,none"],
               mean_mc_stderr=mc["wiki_cloze"]["mean_mc_stderr"], seconds_elbo=time.perf_counter() - t0)
    if exact and method != "ar":
        t0 = time.perf_counter()
        path = out / "lmeval-wiki_cloze-exact.json"  # deterministic: an earlier result is read, not recomputed
        if path.exists():
            order = json.loads(path.read_text())
        else:
            path, order = run_lm_eval(run, tasks=["wiki_cloze"], include_path=str(tasks), likelihood="exact-order",
                                      out=out, greedy=False)
        row.update(acc_order=order["results"]["wiki_cloze"]["acc,none"],
                   acc_order_se=order["results"]["wiki_cloze"]["acc_stderr,none"], file_order=str(path),
                   seconds_order=time.perf_counter() - t0)
    docs = [json.loads(line)["text"] for line in (tasks / "wiki_rolling.jsonl").read_text().splitlines()]
    seq_len = read_run_config(run).data.seq_len
    chunks = sum(len(d) for d in docs) // seq_len
    target = out / f"eval-test-n{chunks}-K{eval_draws}.json"
    t0 = time.perf_counter()
    ev = run_eval(run, split="test", draws=eval_draws, max_chunks=chunks, out=target, progress=False)
    mc_eval = ev.get("mc_stderr", 0.0) if method != "ar" else 0.0
    row.update(eval_bpc=ev["bits_per_token"], eval_mc=mc_eval, eval_chunks=chunks, seconds_eval=time.perf_counter() - t0,
               agree_z=(row["bpc"] - ev["bits_per_token"]) / math.hypot(row["bpc_mc"] or 0.0, mc_eval)
               if (row["bpc_mc"] or mc_eval) else None)
    return row


def estimator_errors(run: Path, tasks: Path, draws: int, items: int) -> dict:
    """Mean Monte Carlo standard error (nats) of the mask-count and time estimators on the choices of
    the first ``items`` cloze items, K = ``draws`` each, and their ratio."""
    loaded = load(run)
    codec = TextCodec(loaded.tokenizer, characters=True)
    docs = [json.loads(line) for line in (tasks / "wiki_cloze.jsonl").read_text().splitlines()][:items]
    windows = [w for d in docs for c in d["choices"]
               for w in pair_windows(*codec.encode_pair(d["context"], c), loaded.config.data.seq_len)]
    out = {"requests": len(windows), "draws": draws}
    for name in ESTIMATORS:
        est = LikelihoodEstimator(loaded.model, estimator=name, draws=draws, greedy=False).estimate(windows)
        out[name] = sum(e.stderr for e in est) / len(est)
    out["ratio"] = out["times"] / out["counts"]
    return out


def table(rows: list[dict]) -> str:
    lines = ["| model | cloze acc (ELBO) [95% CI] | cloze acc (exact order) | flip within 2 MC se | rolling bits/char "
             "± MC se | word ppl | `maskdiff eval` bits/char ± MC se | difference / MC se |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"{r['acc']:.3f} [{r['acc'] - Z95 * r['acc_se']:.3f}, {r['acc'] + Z95 * r['acc_se']:.3f}]"
        order = (f"{r['acc_order']:.3f} [{r['acc_order'] - Z95 * r['acc_order_se']:.3f}, "
                 f"{r['acc_order'] + Z95 * r['acc_order_se']:.3f}]") if "acc_order" in r else "(= ELBO: exact)"
        z = f"both exact: Δ = {r['bpc'] - r['eval_bpc']:.1e}" if r["agree_z"] is None else f"{r['agree_z']:+.2f}"
        lines.append(f"| {r['method']} | {ci} | {order} | {r['flip']:.3f} | {r['bpc']:.4f} ± {r['bpc_mc'] or 0:.4f} "
                     f"| {r['word_ppl']:.1f} | {r['eval_bpc']:.4f} ± {r['eval_mc']:.4f} | {z} |")
    return "\n".join(lines)


def write_new(path: Path, obj: object) -> Path:
    """Write JSON to ``path``, or to ``<stem>-2``, ``-3``, ... when it exists (nothing is replaced)."""
    target, k = path, 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.stem}-{k}{path.suffix}")
    target.write_text(json.dumps(obj, indent=2) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="folder with the run folders ar, md4, genmd4 (read only)")
    parser.add_argument("--tasks", required=True, help="the folder bench/build_cloze.py wrote")
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="ar,md4,genmd4")
    parser.add_argument("--draws", type=int, default=4, help="K for the harness's ELBO estimates")
    parser.add_argument("--eval-draws", type=int, default=2, help="time draws of maskdiff eval (≥ 2: its MC error)")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact-order cloze runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for method in args.methods.split(","):
        out = Path(args.out) / method
        out.mkdir(parents=True, exist_ok=True)
        rows.append(evaluate(Path(args.runs) / method, Path(args.tasks), out, args.draws, args.eval_draws,
                             not args.no_exact))
        if rows[-1]["method"] == "md4":
            rows[-1]["estimator_errors"] = estimator_errors(Path(args.runs) / method, Path(args.tasks), args.draws, 100)
        print(json.dumps(rows[-1]), flush=True)
        write_new(out / "row.json", rows[-1])
    # the table holds the newest row of every method under OUT (methods may be run one at a time)
    rows = [json.loads(max(d.glob("row*.json"), key=lambda p: p.stat().st_mtime).read_text())
            for d in sorted(Path(args.out).iterdir()) if d.is_dir() and list(d.glob("row*.json"))]
    order = {m: i for i, m in enumerate(["ar", "md4", "genmd4"])}
    rows.sort(key=lambda r: order.get(r["method"], 9))
    summary = write_new(Path(args.out) / "compare.json", rows)
    print(table(rows))
    for r in rows:
        if "estimator_errors" in r:
            e = r["estimator_errors"]
            print(f"{r['method']}: mean MC stderr over {e['requests']} cloze requests, K={e['draws']}: mask counts "
                  f"{e['counts']:.4f} nats, times {e['times']:.4f} nats ({e['ratio']:.1f}x)")
    print(f"written: {summary}")


if __name__ == "__main__":
    main()
