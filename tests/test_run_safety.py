"""Nothing silently wrong in a run folder (issue 13, principles 1, 2 and the run-folder parts of 3-5).

Every case goes through the real command line (``maskdiff.cli.main`` in this process, or
``python -m maskdiff.cli`` where processes must run at the same time) in a temporary folder, and
checks the exit code, the one ``error:`` line, and that files which must not change are
byte-identical afterwards:

* divergence (lr 1e6): skipped steps, a one-line stop, no non-finite tensor in any file, the good
  checkpoints kept, also after ``--resume``; the device-side skip equals the per-step one;
* one writer per run folder: a second ``train`` fails at once naming the holder's PID, readers
  (``sample``, ``eval``, ``maskdiff.load``) never touch ``checkpoints/``, Ctrl-C saves and says
  where to resume (real processes);
* a torn last line of ``metrics.jsonl`` repaired on resume;
* checks before the work: steps, architecture, flags, backup names, the current folder,
  read-only folders, a full disk;
* loading: truncated, hostile or disagreeing files named in one line.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskdiff.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint
from maskdiff.cli import main
from maskdiff.config import apply_overrides, get_preset
from maskdiff.fileio import FolderLock, repair_last_line
from maskdiff.runs import load
from maskdiff.training import Trainer
from maskdiff.training.guard import TrainingDiverged, max_nonfinite_steps

TINY = [
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "data.seq_len=32",
    "train.batch_size=8", "train.log_every=1", "train.eval_every=0", "train.save_every=2",
    "optim.warmup_steps=2", "optim.lr=3e-3", "optim.ema_decay=0.9", "train.num_threads=1",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train_args(out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["train", "--preset", "demo", "--out", str(out), "--no-progress", *sets(*TINY, f"train.steps={steps}"),
            *extra]


def cli(capsys, *args: str) -> tuple[int, list[str]]:
    """Exit code and the non-empty stderr lines of one command."""
    capsys.readouterr()
    code = main(list(args))
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def one_error(lines: list[str], *, alone: bool = True) -> str:
    """The single ``error:`` line (and, with ``alone``, the only line) of a failed command."""
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    if alone:
        assert lines == errors, lines
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), empty folders included."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() else b"<dir>"
    return out


def tensor_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".pt"))


def assert_all_finite(folder: Path) -> None:
    """No non-finite value in any tensor file under ``folder`` (weights, EMA, optimiser, pretrained)."""
    def visit(obj, where):
        if isinstance(obj, torch.Tensor):
            assert not obj.is_floating_point() or torch.isfinite(obj).all(), where
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, f"{where}:{k}")
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, where)

    for f in tensor_files(folder):
        if any(part.endswith(".tmp") for part in f.parts):
            continue  # a killed writer's leftovers (never read)
        visit(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True), str(f))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 4-step run with checkpoints step-2 and step-4 (copied by each test that needs it)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(train_args(out)) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002", "step-00000004"]
    return out


@pytest.fixture
def run(base_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


# -- 1. divergence never reaches a checkpoint -----------------------------------------------------


def test_divergence_stops_with_one_line_and_writes_nothing_non_finite(tmp_path, capsys):
    out = tmp_path / "run"
    code, lines = cli(capsys, *train_args(out, *sets("optim.lr=1e6"), steps=40))
    assert code == TrainingDiverged.exit_code == 1
    line = one_error(lines)
    assert "diverged" in line and "train.max_nonfinite_steps=10" in line and "optim.lr" in line
    assert not (out / "pretrained").exists()
    assert_all_finite(out)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["stopped"] == "diverged" and records[-1]["nonfinite_total"] >= 10
    assert sum(r.get("nonfinite_steps", 0) for r in records) == records[-1]["nonfinite_total"]
    assert not (out / ".lock").exists()
    assert f"step {checkpoint_step(out)} " in line  # the message names the checkpoint to go back to


def test_divergence_after_resume_keeps_the_good_checkpoints(run, capsys):
    before = snapshot(run / "checkpoints")
    code, lines = cli(capsys, "train", "--out", str(run), "--resume", "--no-progress",
                      *sets("train.steps=40", "optim.lr=1e6", "train.max_nonfinite_steps=3"))
    assert code == 1
    line = one_error(lines, alone=False)
    assert "3 steps in a row" in line and "the latest checkpoint is step 4" in line
    assert snapshot(run / "checkpoints") == before  # nothing pruned, nothing written over them
    assert_all_finite(run)


def _nan_on(trainer, steps):
    """Make the loss NaN when the trainer is at one of ``steps`` (0-based, before the update)."""
    forward = trainer.model.forward

    def patched(*args, **kwargs):
        terms = forward(*args, **kwargs)
        if trainer.step in steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    trainer.model.forward = patched


def _train_with_nan_steps(out: Path, *, device_skip: bool) -> dict[str, torch.Tensor]:
    cfg = apply_overrides(get_preset("demo"), TINY + ["train.steps=8", "train.save_every=0"])
    trainer = Trainer(cfg, out, progress=False)
    try:
        if device_skip:  # as on CUDA: fused AdamW takes the flag on the device, the host reads it when logging
            trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=3e-3, betas=(0.9, 0.999),
                                                  weight_decay=0.0, fused=True)
            trainer._device_skip = True
        _nan_on(trainer, {2, 3, 6})
        trainer.fit()
    finally:
        trainer.close()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("nonfinite_steps")] == [3, 4, 7]
    assert records[6]["nonfinite_total"] == 3 and math.isnan(records[2]["loss"]) and math.isfinite(records[7]["loss"])
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert state["nonfinite_steps"] == 3 and state["ema_updates"] == 5
    opt = torch.load(latest_checkpoint(out) / "optimizer.pt", weights_only=True)
    assert all(int(s["step"]) == 5 for s in opt["state"].values())  # 8 steps, 3 skipped
    assert_all_finite(out)
    return load_file(str(latest_checkpoint(out) / "ema.safetensors"))


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path):
    """A few NaN steps are skipped (no optimiser or EMA update) and training goes on; the
    device-side skip (no host sync per step) gives the weights of the per-step check."""
    per_step = _train_with_nan_steps(tmp_path / "per-step", device_skip=False)
    on_device = _train_with_nan_steps(tmp_path / "on-device", device_skip=True)
    assert max((per_step[k] - on_device[k]).abs().max().item() for k in per_step) < 1e-5


def test_non_finite_weights_are_never_saved_or_exported(run):
    cfg = apply_overrides(get_preset("demo"), TINY + ["train.steps=6"])
    trainer = Trainer(cfg, run, resume=True, progress=False)
    try:
        before = snapshot(run)
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("inf"))
        with pytest.raises(TrainingDiverged, match="nothing was saved"):
            trainer.save()
        with pytest.raises(TrainingDiverged, match="pretrained/ was not written"):
            trainer._save_pretrained()
        assert snapshot(run) == before
    finally:
        trainer.close()


def test_max_nonfinite_steps_is_checked():
    class Train:
        max_nonfinite_steps = 0

    with pytest.raises(ValueError, match="train.max_nonfinite_steps must be a positive integer"):
        max_nonfinite_steps(Train())


# -- 3. metrics.jsonl --------------------------------------------------------------------------


def test_torn_last_metrics_line_is_repaired_on_resume(run, capsys):
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "split": "tr')  # killed mid-record
    code, lines = cli(capsys, "train", "--out", str(run), "--resume", "--no-progress", *sets("train.steps=6"))
    assert code == 0, lines
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_repair_last_line(tmp_path):
    f = tmp_path / "m.jsonl"
    assert repair_last_line(f) == 0
    f.write_bytes(b'{"a": 1}\n{"b"')
    assert repair_last_line(f) == 4 and f.read_bytes() == b'{"a": 1}\n'
    assert repair_last_line(f) == 0
    f.write_bytes(b'{"b"')
    assert repair_last_line(f) == 4 and f.read_bytes() == b""


# -- 4. problems found before the work ----------------------------------------------------------


@pytest.mark.parametrize("steps, word", [(3, "fewer"), (4, "no more")])
def test_resume_with_no_more_steps_is_refused_and_changes_nothing(run, capsys, steps, word):
    before = snapshot(run)
    code, lines = cli(capsys, "train", "--out", str(run), "--resume", *sets(f"train.steps={steps}"))
    assert code == 2
    line = one_error(lines)
    assert f"it has trained 4 steps and train.steps={steps} asks for {word}" in line and "N > 4" in line
    assert snapshot(run) == before


def test_architecture_change_on_resume_names_the_fields(run, capsys):
    before = snapshot(run)
    code, lines = cli(capsys, "train", "--out", str(run), "--resume",
                      *sets("train.steps=8", "model.d_model=64", "model.n_heads=4"))
    assert code == 2
    line = one_error(lines)
    assert "model.d_model 32 → 64" in line and "model.n_heads 2 → 4" in line and "size mismatch" not in line
    assert snapshot(run) == before


def test_resume_on_data_with_another_vocabulary_names_network_json(run, capsys):
    net = json.loads((run / "network.json").read_text())
    net["vocab_size"] = 28
    (run / "network.json").write_text(json.dumps(net))
    before = snapshot(run)
    code, lines = cli(capsys, "train", "--out", str(run), "--resume", *sets("train.steps=8"))
    assert code == 2
    assert "vocab_size 28 → 27" in one_error(lines) and "network.json" in lines[0]
    assert snapshot(run) == before


def test_a_failed_set_up_leaves_no_stub_folder(tmp_path, capsys, monkeypatch):
    import maskdiff.training.trainer as trainer_module

    def no_data(config):
        raise ValueError("data.corpus: no such data")

    monkeypatch.setattr(trainer_module, "run_data", no_data)
    out = tmp_path / "run"
    code, lines = cli(capsys, *train_args(out))
    assert code == 2 and "no such data" in one_error(lines)
    assert not out.exists()  # created by the failed start, so removed: a retry is not blocked
    monkeypatch.undo()
    assert main(train_args(out, steps=2)) == 0


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, lines = cli(capsys, *train_args(blocker / "run"))
    assert code == 2 and "cannot create the run folder" in one_error(lines) and "--out" in lines[0]
    assert blocker.read_text() == "x"


def test_resume_and_overwrite_together_are_refused(run, capsys):
    before = snapshot(run)
    code, lines = cli(capsys, "train", "--out", str(run), "--resume", "--overwrite", *sets("train.steps=8"))
    assert code == 2 and "pass one of them" in one_error(lines)
    assert snapshot(run) == before


def test_overwrite_when_the_backup_name_exists_loses_nothing(run, capsys, monkeypatch):
    import maskdiff.checkpoint as ckpt

    monkeypatch.setattr(ckpt.time, "strftime", lambda fmt, *a: "20250101-000000")
    taken = run.with_name("run.old-20250101-000000")
    taken.mkdir()
    (taken / "mine.txt").write_text("a user's file")
    before = snapshot(run)
    code, lines = cli(capsys, *train_args(run, "--overwrite", steps=2))
    assert code == 0, lines
    assert (taken / "mine.txt").read_text() == "a user's file" and len(list(taken.iterdir())) == 1
    assert snapshot(run.with_name("run.old-20250101-000000-2")) == before  # the old run, whole
    assert checkpoint_step(run) == 2


def test_overwrite_of_the_current_folder_is_refused(run, capsys, monkeypatch):
    before = snapshot(run)
    monkeypatch.chdir(run)
    code, lines = cli(capsys, *train_args(Path("."), "--overwrite"))
    assert code == 2 and "holds the current folder" in one_error(lines)
    assert snapshot(run) == before and [p.name for p in run.parent.iterdir()] == ["run"]


def test_read_only_run_folder_for_resume_says_where_to_write(run, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == run and mode & os.W_OK
                        else real_access(p, mode, **kw))
    before = snapshot(run)
    code, lines = cli(capsys, "train", "--out", str(run), "--resume", *sets("train.steps=8"))
    assert code == 2
    line = one_error(lines)
    assert "read-only" in line and f"cp -r {run} NEW" in line and "--out NEW --resume" in line
    assert snapshot(run) == before


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import maskdiff.checkpoint as ckpt

    calls = {"n": 0}
    original = ckpt._save_tensors

    def full_disk(tensors, path):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (model, ema, rng) fits; the second does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(tensors, path)

    monkeypatch.setattr(ckpt, "_save_tensors", full_disk)
    out = tmp_path / "run"
    code, lines = cli(capsys, *train_args(out))
    assert code == 1
    line = one_error(lines)
    assert "No space left on device" in line and "step-00000002 is intact" in line and "--resume" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    assert checkpoint_step(out) == 2 and not (out / "pretrained").exists()
    load(out)  # the previous checkpoint is whole


# -- 5. loading: one line naming the file ----------------------------------------------------------


SAMPLE = ("sample", "--num", "1", "--steps", "2", "--length", "8", "--device", "cpu")


def sample(capsys, run: Path) -> tuple[int, list[str]]:
    return cli(capsys, SAMPLE[0], str(run), *SAMPLE[1:])


@pytest.mark.parametrize("name", ["model", "ema"])
def test_truncated_weights_name_the_file_and_the_previous_step(run, capsys, name):
    f = run / "checkpoints" / "step-00000004" / f"{name}.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, lines = sample(capsys, run)
    assert code == 2
    line = one_error(lines)
    assert str(f) in line and "step-00000002" in line and "latest" in line


def test_hostile_safetensors_header_is_refused(run, capsys):
    f = run / "checkpoints" / "step-00000004" / "model.safetensors"
    f.write_bytes((2**62).to_bytes(8, "little") + b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 999]}}')
    code, lines = sample(capsys, run)
    assert code == 2 and str(f) in one_error(lines)


def test_hostile_optimizer_state_is_refused_in_one_line(run, capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Evil(), "param_groups": []}, run / "checkpoints" / "step-00000004" / "optimizer.pt")
    before = snapshot(run)
    code, lines = cli(capsys, "train", "--out", str(run), "--resume", *sets("train.steps=6"))
    assert code == 2
    line = one_error(lines)
    assert "optimizer.pt refused" in line and "weights-only" in line
    assert not marker.exists() and snapshot(run) == before


@pytest.mark.parametrize("content, words", [
    ("[1, 2]", ["network.json is not a valid network config", "JSON object"]),
    ("{not json", ["network.json is not readable JSON"]),
])
def test_bad_network_json_is_named(run, capsys, content, words):
    (run / "network.json").write_text(content)
    code, lines = sample(capsys, run)
    assert code == 2 and all(w in one_error(lines) for w in words)


@pytest.mark.parametrize("key, value, words", [
    ("vocab_size", 28, ["does not match the checkpoint", "vocab_size=28"]),
    ("seq_len", 64, ["seq_len=64", "data.seq_len=32"]),
])
def test_network_json_disagreeing_with_the_checkpoint_is_named(run, capsys, key, value, words):
    net = json.loads((run / "network.json").read_text())
    net[key] = value
    (run / "network.json").write_text(json.dumps(net))
    code, lines = sample(capsys, run)
    assert code == 2
    line = one_error(lines)
    assert str(run / "network.json") in line and all(w in line for w in words)


@pytest.mark.parametrize("content", ["{garbage", "[1]", '{"train": {"steps": 1, "no_such_key": 2}}'])
def test_garbage_config_json_is_named(run, capsys, content):
    (run / "config.json").write_text(content)
    code, lines = sample(capsys, run)
    assert code == 2 and str(run / "config.json") in one_error(lines)


def test_latest_naming_a_missing_step_is_an_error_naming_both(run, capsys):
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    code, lines = sample(capsys, run)
    assert code == 2
    line = one_error(lines)
    assert "'step-00000004', which is missing" in line and "newest complete one is step-00000002" in line


# -- 2. one writer, readers never write ---------------------------------------------------------------


def test_readers_never_create_rename_or_delete(run):
    stale = run / "checkpoints" / "step-00000006.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    before = snapshot(run)
    load(run)
    load(run, weights="raw")
    load_checkpoint(run)
    assert latest_checkpoint(run).name == "step-00000004" and checkpoint_step(run) == 4
    assert snapshot(run) == before


def test_a_stale_lock_of_a_dead_writer_is_taken_over(run, capsys):
    (run / ".lock").write_text("PID 999999 on somewhere since 2020-01-01 00:00:00\n")
    code, lines = cli(capsys, "train", "--out", str(run), "--resume", "--no-progress", *sets("train.steps=6"))
    assert code == 0, lines
    assert checkpoint_step(run) == 6 and not (run / ".lock").exists()


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    a = FolderLock.acquire(tmp_path)
    b = FolderLock.acquire(tmp_path)
    assert "PID " in (tmp_path / ".lock").read_text()
    b.release()
    assert (tmp_path / ".lock").exists()
    a.release()
    assert not (tmp_path / ".lock").exists()


def _start(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "maskdiff.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, list[str]]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, [line for line in err.splitlines() if line.strip()]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_one_writer_readers_alongside_and_ctrl_c_with_real_processes(tmp_path, capsys):
    """A trainer runs (a process of its own); a second writer (another process, and this one with
    --overwrite) fails at once naming its PID; sample and eval (in this process) read the run
    meanwhile without touching it; Ctrl-C saves and says where to resume; the run resumes."""
    out = tmp_path / "run"
    trainer = _start(out, *train_args(out, *sets("train.save_every=25", "train.log_every=10"), steps=1_000_000))
    try:
        _wait_for(lambda: (out / "checkpoints" / "latest").exists(), trainer)
        stale = out / "checkpoints" / "step-99999999.tmp"  # what a reader must never delete
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"half")
        second = _start(out, "train", "--out", str(out), "--resume", "--no-progress")
        code, lines = cli(capsys, *train_args(out, "--overwrite"))
        assert code == 2 and f"is being written by PID {trainer.pid} on " in one_error(lines)
        code, lines = sample(capsys, out)
        assert code == 0, lines
        code, lines = cli(capsys, "eval", str(out), "--max-chunks", "4", "--batch-size", "4", "--device", "cpu")
        assert code == 0, lines
        code, lines = _finish(second)
        assert code == 2 and f"is being written by PID {trainer.pid} on " in one_error(lines)
        assert trainer.poll() is None, "the trainer must not be disturbed"
        assert (stale / "model.safetensors").read_bytes() == b"half"
        assert [p.name for p in tmp_path.iterdir()] == ["run"]  # --overwrite moved nothing aside
        trainer.send_signal(signal.SIGINT)
        code, lines = _finish(trainer)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert code == 130, lines
    line = one_error(lines)
    step = checkpoint_step(out)
    assert f"interrupted at step {step} of 1000000: saved checkpoint step-{step:08d}" in line
    assert "--resume" in line and not (out / ".lock").exists()
    assert_all_finite(out)
    code, lines = cli(capsys, "train", "--out", str(out), "--resume", "--no-progress", *sets(f"train.steps={step + 2}"))
    assert code == 0, lines
    assert checkpoint_step(out) == step + 2 and (out / "pretrained").is_dir()
    assert not stale.exists()  # removed by the writer, on resume
