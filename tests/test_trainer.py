"""Training on real data: loss falls, resume is exact, checkpoints survive SIGKILL, DDP = accumulation."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskdiff.checkpoint import RunFolderError, latest_checkpoint
from maskdiff.config import apply_overrides, get_preset
from maskdiff.data import TokenSplits, load_corpus
from maskdiff.runs import load
from maskdiff.training import Trainer, learning_rate

TINY = [
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "data.seq_len=32",
    "train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
    "optim.warmup_steps=2", "optim.lr=3e-3", "optim.ema_decay=0.9", "train.num_threads=1",
]


@pytest.fixture(scope="module")
def wiki_small():
    """Real character-level Wikipedia, cut to 200k/20k/20k characters to keep the tests fast."""
    full = load_corpus("wiki-char")
    return TokenSplits(name="wiki-char-small", vocab_size=full.vocab_size, tokenizer=full.tokenizer,
                       train=full.train[:200_000], validation=full.validation[:20_000], test=full.test[:20_000])


def tiny_config(*extra):
    return apply_overrides(get_preset("demo"), TINY + list(extra))


def run_trainer(config, out, data, *, resume=False):
    trainer = Trainer(config, out, resume=resume, progress=False, data=data)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def read_metrics(path):
    return [json.loads(line) for line in Path(path, "metrics.jsonl").read_text().splitlines()]


def test_learning_rate_warmup_then_cosine():
    cfg = get_preset("demo").optim
    cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio = 1.0, 10, 0.1
    assert learning_rate(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(9, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.55)
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["md4", "genmd4"])
def test_loss_falls_on_real_data(tmp_path, wiki_small, method):
    cfg = tiny_config("train.steps=40", f"diffusion.method={method}", "train.batch_size=16")
    run_trainer(cfg, tmp_path / "run", wiki_small)
    rows = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    first = sum(r["bits_per_token"] for r in rows[:8]) / 8
    last = sum(r["bits_per_token"] for r in rows[-8:]) / 8
    assert all(torch.isfinite(torch.tensor(r["bits_per_token"])) for r in rows)
    assert last < first - 0.2, (first, last)  # from ~4.75 (uniform) towards the unigram 4.1
    if method == "genmd4":
        # The exponents leave their initial value 1 and are logged.
        assert rows[-1]["w_max"] - rows[-1]["w_min"] > 1e-3
        assert abs(rows[-1]["w_mean"] - 1.0) > 1e-4
        run = load(tmp_path / "run")
        w = run.model.schedule.exponents
        assert (w - 1.0).abs().max() > 1e-3


def test_resume_reproduces_uninterrupted_run_bitwise(tmp_path, wiki_small):
    straight = tiny_config("train.steps=6")
    run_trainer(straight, tmp_path / "a", wiki_small)

    first_half = tiny_config("train.steps=6")
    first_half.train.steps = 6
    trainer = Trainer(first_half, tmp_path / "b", progress=False, data=wiki_small)
    for _ in range(3):
        trainer.train_step()
    trainer.save()
    trainer.close()
    del trainer
    run_trainer(first_half, tmp_path / "b", wiki_small, resume=True)

    a = load_file(str(latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ea = load_file(str(latest_checkpoint(tmp_path / "a") / "ema.safetensors"))
    eb = load_file(str(latest_checkpoint(tmp_path / "b") / "ema.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import maskdiff.checkpoint as ckpt
    from maskdiff.config import apply_overrides, get_preset
    from maskdiff.data import TokenSplits, load_corpus
    from maskdiff.training import Trainer

    calls = {"n": 0}
    original = ckpt._save_tensors

    def dying_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 5:  # second checkpoint: model file written, die while writing the EMA
            with open(path, "wb") as f:
                f.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        original(tensors, path)

    ckpt._save_tensors = dying_save
    full = load_corpus("wiki-char")
    data = TokenSplits(name="w", vocab_size=27, tokenizer=full.tokenizer, train=full.train[:100_000],
                       validation=full.validation[:10_000], test=full.test[:10_000])
    cfg = apply_overrides(get_preset("demo"), sys.argv[2:])
    Trainer(cfg, sys.argv[1], progress=False, data=data).fit()
    """
)


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, wiki_small):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "run"
    overrides = TINY + ["train.steps=6", "train.save_every=2"]
    proc = subprocess.run([sys.executable, str(script), str(out), *overrides], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # The half-written checkpoint is a .tmp folder; the latest complete one is step 2.
    assert (out / "checkpoints" / "step-00000004.tmp").is_dir()
    assert latest_checkpoint(out).name == "step-00000002"
    cfg = apply_overrides(get_preset("demo"), overrides)
    trainer = run_trainer(cfg, out, wiki_small, resume=True)
    assert trainer.step == 6
    assert latest_checkpoint(out).name == "step-00000006"
    assert not list((out / "checkpoints").glob("*.tmp"))


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    from maskdiff.config import apply_overrides, get_preset
    from maskdiff.data import TokenSplits, load_corpus
    from maskdiff.training import Trainer

    full = load_corpus("wiki-char")
    data = TokenSplits(name="w", vocab_size=27, tokenizer=full.tokenizer, train=full.train[:200_000],
                       validation=full.validation[:20_000], test=full.test[:20_000])
    cfg = apply_overrides(get_preset("demo"), sys.argv[2:])
    trainer = Trainer(cfg, sys.argv[1], progress=False, data=data)
    try:
        trainer.fit()
    finally:
        trainer.close()
    """
)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_accumulation(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    common = TINY + ["train.steps=4", "train.save_every=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
         str(script), str(tmp_path / "ddp"), *common, "train.grad_accum=1"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), *common, "train.grad_accum=2"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    a = load_file(str(latest_checkpoint(tmp_path / "ddp") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "single") / "model.safetensors"))
    # Same data, same draws; only the order of float additions differs (all-reduce vs accumulation).
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    moved = max((a[k] - torch.zeros_like(a[k])).abs().max().item() for k in a if "head" in k)
    assert moved > 1e-4, "the head starts at zero and must have been trained"


def test_cli_train_eval_sample_end_to_end(tmp_path):
    from maskdiff.cli import main

    out = tmp_path / "cli-run"
    args = ["train", "--preset", "demo", "--out", str(out), "--no-progress"]
    for item in TINY + ["train.steps=4", "train.eval_every=4", "train.eval_batches=1"]:
        args += ["--set", item]
    assert main(args) == 0
    for name in ("config.json", "network.json", "meta.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "meta.json").read_text())
    assert "torch" in meta["libraries"] and meta["vocab_size"] == 27
    # Refuses to overwrite, names the flags.
    assert main(args) == 2
    assert main(["eval", str(out), "--split", "test", "--max-chunks", "32", "--device", "cpu"]) == 0
    result = json.loads((out / "eval-test-n32.json").read_text())
    assert result["ci95"][0] < result["bits_per_token"] < result["ci95"][1]
    assert main(["sample", str(out), "--num", "2", "--steps", "8", "--length", "24",
                 "--out", str(tmp_path / "s.jsonl"), "--device", "cpu"]) == 0
    lines = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and len(lines[0]["text"]) == 24 and lines[0]["precision"] == "float64"


def test_cli_rejects_unknown_keys_and_prints_config(capsys):
    from maskdiff.cli import main

    assert main(["train", "--preset", "demo", "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.stepz'" in err and "train.steps" in err
    assert main(["train", "--preset", "demo", "--print-config", "--set", "train.steps=7"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == 7


def test_load_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(RunFolderError, match="not a run folder"):
        load(tmp_path)


def test_resume_with_more_steps_records_the_config_change(tmp_path, wiki_small):
    """Extending a finished run (--resume --set train.steps=N) trains on, and config.json says so
    while the previous config is kept."""
    out = tmp_path / "run"
    run_trainer(tiny_config("train.steps=2", "train.save_every=2"), out, wiki_small)
    longer = tiny_config("train.steps=4", "train.save_every=2")
    trainer = run_trainer(longer, out, wiki_small, resume=True)
    assert trainer.step == 4
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 4
    assert json.loads((out / "config.before-step-2.json").read_text())["train"]["steps"] == 2


def test_a_run_from_before_head_init_resumes_and_keeps_its_record(tmp_path, wiki_small):
    """A 0.2 run folder (network.json and config.json without head_init; its head started at zero)
    resumes under today's default: the field only chose starting values, which the checkpoint
    replaces. The folder keeps saying how its head started."""
    out = tmp_path / "run"
    run_trainer(tiny_config("train.steps=2", "train.save_every=2", "model.head_init=zero"), out, wiki_small)
    for name, section in (("network.json", None), ("config.json", "model")):
        data = json.loads((out / name).read_text())
        (data if section is None else data[section]).pop("head_init")
        (out / name).write_text(json.dumps(data))
    trainer = run_trainer(tiny_config("train.steps=3", "train.save_every=3"), out, wiki_small, resume=True)
    assert trainer.step == 3
    assert "head_init" not in json.loads((out / "network.json").read_text())
    assert load(out).model.network.config.head_init == "zero"  # the legacy value of a file without it


def test_a_network_that_differs_in_more_than_head_init_is_still_refused(tmp_path, wiki_small):
    out = tmp_path / "run"
    run_trainer(tiny_config("train.steps=2", "train.save_every=2", "model.head_init=zero"), out, wiki_small)
    data = json.loads((out / "network.json").read_text())
    data["norm_eps"] = 1e-3
    (out / "network.json").write_text(json.dumps(data))
    with pytest.raises(RunFolderError, match="norm_eps"):
        run_trainer(tiny_config("train.steps=3", "train.save_every=3"), out, wiki_small, resume=True)
