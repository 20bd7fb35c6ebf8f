"""Records of variable length, worked example: arithmetic equations such as ``127+58=185``.

Write the data set (one equation per line; each operand has 1, 2 or 3 digits with equal probability,
so records are 5 to 12 characters long), train on it with ``data.records=lines`` and score samples:

    python examples/equations.py write runs/equations.txt --num 50000 --seed 0
    maskdiff compare --preset demo --methods ar,md4,genmd4 --out runs/eq-compare \\
        --set data.corpus=files --set data.path=runs/equations.txt --set data.tokenizer=char \\
        --set data.records=lines --set data.seq_len=16 --set train.batch_size=128 \\
        --set train.steps=1200 --set train.num_threads=1
    python examples/equations.py score runs/eq-compare/md4 runs/eq-compare/genmd4 runs/eq-compare/ar \\
        --num 1000 --data runs/equations.txt --out runs/eq-compare/samples.json
    python examples/equations.py plot runs/eq-compare/samples.json docs/equations-lengths.png

``score`` draws ``--num`` samples from each run (MD4/GenMD4 with ``maskdiff``'s ancestral sampler;
the autoregressive baseline token by token with :func:`ar_sample`), decodes them (a record ends at
its first end token), and reports the fraction *well-formed* (``A+B=C`` with numbers written
without leading zeros) and the fraction *correct* (well-formed and ``A + B = C``), each with a 95%
Wilson interval, plus the distribution of sample lengths against the data's.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from maskdiff import load
from maskdiff.apps.generate import generate_tokens
from maskdiff.metrics import Z95

WELL_FORMED = re.compile(r"(0|[1-9][0-9]*)\+(0|[1-9][0-9]*)=(0|[1-9][0-9]*)")


def write_equations(path: Path, num: int, seed: int) -> None:
    """``num`` equations ``A+B=C`` (A, B with 1–3 digits, equally likely), one per line, seeded."""
    rng = np.random.default_rng(seed)
    lows, highs = np.array([0, 10, 100]), np.array([10, 100, 1000])

    def operand() -> np.ndarray:
        d = rng.integers(0, 3, num)
        return rng.integers(lows[d], highs[d])

    a, b = operand(), operand()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}+{y}={x + y}\n" for x, y in zip(a.tolist(), b.tolist())), encoding="utf-8")


def judge(text: str) -> tuple[bool, bool]:
    """(well-formed, correct) of one decoded sample."""
    m = WELL_FORMED.fullmatch(text)
    if m is None:
        return False, False
    a, b, c = (int(g) for g in m.groups())
    return True, a + b == c


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (95% by default)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def ar_sample(run, num: int, seed: int, batch: int = 500) -> torch.Tensor:
    """Ancestral samples of the autoregressive baseline, one token at a time (exact float64 draws).

    The causal network reads the sequence shifted right by one with the mask id ``V`` as its
    beginning-of-sequence token (as in training, :func:`maskdiff.losses.ar_nll_terms`); the logits
    at position ``i`` give ``p(x_i | x_<i)``. Returns ``(num, L)`` token ids.
    """
    net, vocab, length = run.model.network, run.model.vocab_size, run.config.data.seq_len
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num, batch):
        b = min(batch, num - start)
        inputs = torch.full((b, length), vocab, dtype=torch.long)
        x = torch.empty((b, length), dtype=torch.long)
        for i in range(length):
            probs = torch.softmax(net(inputs, None)[:, i].double(), dim=-1)
            x[:, i] = torch.multinomial(probs, 1, generator=g)[:, 0]
            if i + 1 < length:
                inputs[:, i + 1] = x[:, i]
        out.append(x)
    return torch.cat(out)


def sample_texts(run_dir: str, num: int, steps: int, seed: int) -> tuple[str, list[str], int]:
    """(method, decoded samples, how many rows hold only end tokens after their first one) of a run."""
    run = load(run_dir)
    method = run.config.diffusion.method
    if method == "ar":
        tokens = ar_sample(run, num, seed)
    else:
        tokens, _, _ = generate_tokens(run, num=num, steps=steps, seed=seed, device="cpu", progress=False)
    end = tokens == run.tokenizer.eos_id
    clean = int(((end.cumsum(1) > 0) <= end).all(1).sum())  # after the first end token, end tokens only
    return method, [run.tokenizer.decode(row) for row in tokens], clean


def score(args: argparse.Namespace) -> None:
    data_lengths = Counter(len(line) for line in Path(args.data).read_text().splitlines() if line)
    results = {}
    for run_dir in args.runs:
        method, texts, clean = sample_texts(run_dir, args.num, args.steps, args.seed)
        judged = [judge(t) for t in texts]
        formed, correct = sum(w for w, _ in judged), sum(c for _, c in judged)
        results[method] = {
            "run": run_dir, "num": len(texts), "steps": None if method == "ar" else args.steps, "seed": args.seed,
            "well_formed": formed / len(texts), "well_formed_ci95": wilson(formed, len(texts)),
            "correct": correct / len(texts), "correct_ci95": wilson(correct, len(texts)),
            "clean_tail": clean / len(texts), "clean_tail_ci95": wilson(clean, len(texts)),
            "lengths": dict(sorted(Counter(len(t) for t in texts).items())), "examples": texts[:8],
        }
    results["data"] = {"file": args.data, "lengths": dict(sorted(data_lengths.items()))}
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot_lengths(results, Path(args.plot))


def format_table(results: dict) -> str:
    lines = ["| model | well-formed [95% interval] | correct [95% interval] | only end tokens after the first |",
             "|---|---|---|---|"]
    for method, r in results.items():
        if method == "data":
            continue
        cells = [f"{r[k]:.3f} [{r[k + '_ci95'][0]:.3f}, {r[k + '_ci95'][1]:.3f}]"
                 for k in ("well_formed", "correct", "clean_tail")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    total = sum(results["data"]["lengths"].values())
    lines += ["", "length (characters): " + ", ".join(f"{k}" for k in results["data"]["lengths"])]
    lines.append("data:    " + ", ".join(f"{v / total:.3f}" for v in results["data"]["lengths"].values()))
    for method, r in results.items():
        if method != "data":
            lines.append(f"{method}: " + json.dumps({k: round(v / r['num'], 3) for k, v in r["lengths"].items()}))
    return "\n".join(lines)


def plot_lengths(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in results if m != "data"]
    keys = sorted({int(k) for r in results.values() for k in r["lengths"]})
    width = 0.8 / (len(methods) + 1)
    fig, ax = plt.subplots(figsize=(6, 3))
    for j, name in enumerate(["data", *methods]):
        counts = {int(k): v for k, v in results[name]["lengths"].items()}
        total = sum(counts.values())
        ax.bar([k + (j - len(methods) / 2) * width for k in keys], [counts.get(k, 0) / total for k in keys],
               width=width, label=name)
    ax.set_xlabel("record length (characters)")
    ax.set_ylabel("fraction")
    ax.set_xticks(keys)
    ax.legend(frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the equations file")
    w.add_argument("path", type=Path)
    w.add_argument("--num", type=int, default=50_000)
    w.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="sample each run and score the samples")
    s.add_argument("runs", nargs="+")
    s.add_argument("--data", required=True, help="the equations file (for its length distribution)")
    s.add_argument("--num", type=int, default=1000)
    s.add_argument("--steps", type=int, default=64, help="sampling steps of the diffusion runs")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="write the results as JSON here")
    s.add_argument("--plot", help="write a PNG of the length distributions here")
    p = sub.add_parser("plot", help="plot the length distributions of a score --out file")
    p.add_argument("results", type=Path)
    p.add_argument("png", type=Path)
    args = parser.parse_args(argv)
    if args.command == "plot":
        plot_lengths(json.loads(args.results.read_text()), args.png)
    elif args.command == "write":
        write_equations(args.path, args.num, args.seed)
        print(f"wrote {args.num} equations to {args.path}", file=sys.stderr)
    else:
        score(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
