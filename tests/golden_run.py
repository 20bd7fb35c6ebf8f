"""The golden run folder: a ~10k-parameter MD4 written by maskdiff 0.1.0, and the numbers it gives.

``tests/data/golden-run/`` was written once by ``python tests/golden_run.py write`` with the 0.1.0
code (commit 4359ee8). ``tests/test_golden_run.py`` checks that today's code loads it and reproduces
the stored numbers: the run-folder format and the evaluation/sampling arithmetic survive every
refactor. Re-write it only when the format or the arithmetic changes on purpose, and say so in the
changelog.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "data" / "golden-run"
EXPECTED = GOLDEN.parent / "golden-run-expected.json"
TINY = [
    "model.n_layers=1", "model.d_model=16", "model.n_heads=2", "data.seq_len=32",
    "train.batch_size=8", "train.steps=3", "train.log_every=1", "train.eval_every=0",
    "train.save_every=3", "optim.warmup_steps=1", "optim.lr=3e-3", "optim.ema_decay=0.5",
    "train.num_threads=1",
]
EVAL_ARGS = ["--split", "test", "--max-chunks", "2", "--batch-size", "2", "--device", "cpu"]


def probe_input(vocab_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed partly-masked batch (2, seq_len) and times, the same on every machine."""
    g = torch.Generator().manual_seed(1234)
    z = torch.randint(0, vocab_size, (2, seq_len), generator=g)
    z[:, ::3] = vocab_size
    return z, torch.tensor([0.3, 0.8])


def measure(run_dir: Path) -> dict:
    """Every number the golden test compares: logits of the loaded model, eval results, samples."""
    import maskdiff

    out: dict = {}
    for weights in ("ema", "raw"):
        run = maskdiff.load(run_dir, weights=weights)
        net = run.model.network
        z, t = probe_input(net.config.vocab_size, run.config.data.seq_len)
        with torch.no_grad():
            logits = run.model.denoiser(z, t).double()
        out[weights] = {"step": run.step, "weights": run.weights, "logits_sum": logits.sum().item(),
                        "logits_abs_sum": logits.abs().sum().item(),
                        "logits_first": logits[0, 0, :5].tolist()}
    for extra, name in (([], "eval-test.json"), (["--steps", "10", "--draws", "2"], "eval-test-T10-K2.json")):
        subprocess.run([sys.executable, "-m", "maskdiff.cli", "eval", str(run_dir), *EVAL_ARGS, *extra,
                        "--out", str(run_dir / name)], check=True, capture_output=True)
        rec = json.loads((run_dir / name).read_text())
        out[name] = {k: rec[k] for k in ("bits_per_token", "stderr", "n_sequences", "nats_per_sequence")
                     if k in rec}
    run = maskdiff.load(run_dir)
    tokens = maskdiff.sample(run.model.denoiser, run.model.schedule, batch_size=2, length=run.config.data.seq_len,
                             vocab_size=run.model.network.config.vocab_size, num_steps=8,
                             generator=torch.Generator().manual_seed(0))
    out["sample_tokens"] = tokens.tolist()
    return out


def write() -> None:
    from maskdiff.config import apply_overrides, get_preset
    from maskdiff.training import train

    if GOLDEN.exists():
        shutil.rmtree(GOLDEN)
    train(apply_overrides(get_preset("demo"), TINY), str(GOLDEN), progress=False)
    for junk in ("metrics.jsonl",):
        (GOLDEN / junk).unlink(missing_ok=True)
    shutil.rmtree(GOLDEN / "pretrained", ignore_errors=True)
    for f in GOLDEN.glob("eval-*.json"):
        f.unlink()
    EXPECTED.write_text(json.dumps(measure_copy(), indent=1) + "\n")


def measure_copy() -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(GOLDEN, copy)
        return measure(copy)


if __name__ == "__main__":
    if sys.argv[1:] == ["write"]:
        write()
    print(json.dumps(measure_copy(), indent=1))
