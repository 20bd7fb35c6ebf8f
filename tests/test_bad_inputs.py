"""Bad inputs through the real command line: one line naming the problem and the fix, the right
exit code (2: bad input, nothing done; 1: the work failed), and nothing a user has is changed.

Covers the command-line, config and apps side of issue 13: config validation (non-finite floats,
zero counts, no stub folder), ``eval`` (result files named by their settings, NaN never written,
splits shorter than a chunk, read-only runs), ``sample`` (``--length 0``, prompts outside the
alphabet, infill templates without a gap, ``--guidance nan``, ``--out`` checked before sampling),
``compare`` (another budget refused or retrained, tables never replaced by other settings) and
``plot`` (output folders checked first). Tiny runs are trained once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskdiff import cli
from maskdiff.apps import checks
from maskdiff.config import config_from_dict

TINY = ["--set", "model.n_layers=1", "--set", "model.d_model=32", "--set", "model.n_heads=2",
        "--set", "data.seq_len=32", "--set", "train.batch_size=8", "--set", "train.eval_every=3",
        "--set", "train.eval_batches=1", "--set", "train.log_every=1", "--no-progress"]


def train_args(out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["train", "--preset", "demo", "--out", str(out), "--set", f"train.steps={steps}", *TINY, *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its bytes: equal snapshots = byte-identical."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def run_cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, list[str]]:
    """Run ``maskdiff ARGS`` in this process; (exit code, non-empty stderr lines)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def refused(capsys: pytest.CaptureFixture, *args: object, words: tuple[str, ...] = (), code: int = 2) -> str:
    """Assert ``maskdiff ARGS`` fails with ``code`` and exactly one stderr line containing ``words``."""
    got, lines = run_cli(capsys, *args)
    assert got == code, (got, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def real_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m maskdiff.cli ARGS`` as a real process (exit code and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "maskdiff.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained MD4 run (character-level Wikipedia), shared by the module: tests that change
    it work on a copy (:func:`copy_of`)."""
    out = tmp_path_factory.mktemp("bad") / "md4"
    assert cli.main(train_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional U-Net run on 8×8 digits."""
    out = tmp_path_factory.mktemp("bad") / "digits"
    sets = ["data.corpus=digits", "data.seq_len=64", "model.architecture=unet", "model.d_model=16",
            "model.n_heads=2", "model.unet_channel_mult=1,2", "model.unet_res_blocks=1", "train.steps=2",
            "train.batch_size=8", "train.eval_every=0", "train.save_every=2", "train.num_threads=1"]
    args = ["train", "--preset", "mnist-md4", "--out", str(out), "--no-progress"]
    for item in sets:
        args += ["--set", item]
    assert cli.main(args) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    return dst


def pretend_read_only(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """Make the permission check see ``folders`` (and everything inside) as read-only: tests run as
    root here, for whom chmod does not stop writes."""
    roots = [f.resolve() for f in folders]
    real = checks.is_writable

    def is_writable(folder: str | os.PathLike) -> bool:
        p = Path(folder).resolve()
        return not any(p == r or r in p.parents for r in roots) and real(folder)

    monkeypatch.setattr(checks, "is_writable", is_writable)


# ---------------------------------------------------------------------------------------------
# Config validation: every bad value is one line naming the key; no stub folder is left behind.


@pytest.mark.parametrize("item, words", [
    ("optim.lr=inf", ("optim.lr=inf", "finite")),
    ("optim.lr=nan", ("optim.lr=nan", "finite")),
    ("diffusion.eps=-inf", ("diffusion.eps", "finite")),
    ("optim.beta2=nan", ("optim.beta2", "finite")),
    ("model.dropout=inf", ("model.dropout", "finite")),
    ("train.grad_accum=0", ("train.grad_accum=0", "≥ 1")),
    ("model.n_heads=0", ("model.n_heads=0", "≥ 1")),
    ("train.batch_size=0", ("train.batch_size=0", "≥ 1")),
    ("train.log_every=0", ("train.log_every=0", "≥ 1")),
    ("optim.lr=-1e-3", ("optim.lr", "> 0")),
])
def test_config_values_refused_by_key_without_a_folder(capsys, tmp_path, item, words):
    out = tmp_path / "run"
    refused(capsys, *train_args(out, "--set", item), words=words)
    assert not out.exists()


def test_failed_validation_leaves_nothing_that_blocks_a_retry(capsys, tmp_path):
    out = tmp_path / "run"
    refused(capsys, *train_args(out, "--set", "train.batch_size=0", steps=2), words=("train.batch_size",))
    assert not out.exists()
    assert cli.main(train_args(out, "--set", "train.batch_size=8", steps=2)) == 0  # the retry just works
    assert (out / "checkpoints" / "latest").is_file()


def test_config_json_with_values_of_the_wrong_type_names_the_key():
    with pytest.raises(ValueError, match=r"train\.steps='many': expected an integer"):
        config_from_dict({"train": {"steps": "many"}})
    with pytest.raises(ValueError, match=r"optim\.lr=True: expected a number"):
        config_from_dict({"optim": {"lr": True}})
    with pytest.raises(ValueError, match="JSON object"):
        config_from_dict(["not", "a", "config"])  # type: ignore[arg-type]


def test_lr_inf_from_the_real_command_line(tmp_path):
    proc = real_cli(*train_args(tmp_path / "run", "--set", "optim.lr=inf"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: optim.lr=inf: must be a finite number"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# eval


@pytest.mark.parametrize("extra, words", [
    (["--batch-size", "0"], ("--batch-size 0", "positive integer")),
    (["--max-chunks", "0"], ("--max-chunks 0", "omit it to evaluate the whole split")),
    (["--draws", "0"], ("--draws 0",)),
    (["--steps", "0"], ("--steps 0", "continuous-time")),
])
def test_eval_bad_numbers_refused_before_any_work(capsys, run, extra, words):
    before = snapshot(run)
    line = refused(capsys, "eval", run, *extra, words=words)
    assert "fewer than one chunk" not in line  # the old, false message of --max-chunks 0
    assert snapshot(run) == before


def test_eval_results_of_other_settings_never_replace_each_other(capsys, run, tmp_path):
    run = copy_of(run, tmp_path)
    assert cli.main(["eval", str(run), "--device", "cpu"]) == 0
    whole = (run / "eval-test.json").read_bytes()
    assert json.loads(whole)["max_chunks"] is None and json.loads(whole)["batch_size"] == 64
    assert cli.main(["eval", str(run), "--max-chunks", "2", "--device", "cpu"]) == 0
    assert cli.main(["eval", str(run), "--max-chunks", "2", "--weights", "raw", "--device", "cpu"]) == 0
    assert cli.main(["eval", str(run), "--max-chunks", "4", "--batch-size", "2", "--device", "cpu"]) == 0
    assert (run / "eval-test.json").read_bytes() == whole  # the whole-split result is intact
    part = json.loads((run / "eval-test-n2.json").read_text())
    raw = json.loads((run / "eval-test-n2-raw.json").read_text())
    small = json.loads((run / "eval-test-n4-b2.json").read_text())
    assert part["n_sequences"] == 2 and part["weights"] == "ema" and raw["weights"] == "raw"
    assert small["n_sequences"] == 4 and small["batch_size"] == 2
    # Again with the same settings: the same file is refreshed (the same computation).
    assert cli.main(["eval", str(run), "--max-chunks", "2", "--device", "cpu"]) == 0
    assert json.loads((run / "eval-test-n2.json").read_text())["bits_per_token"] == part["bits_per_token"]


def test_eval_refuses_to_replace_a_file_holding_other_settings(capsys, run, tmp_path):
    """A file of an older version under the plain name (e.g. `eval --max-chunks 2` of 0.2) is kept."""
    run = copy_of(run, tmp_path)
    legacy = {"bits_per_token": 4.0, "split": "test", "num_steps": None, "seed": 0, "num_time_draws": 1,
              "weights": "ema", "n_sequences": 2, "ci95": [3.9, 4.1], "stderr": 0.05}
    (run / "eval-test.json").write_text(json.dumps(legacy))
    before = snapshot(run)
    refused(capsys, "eval", run, "--device", "cpu", words=("eval-test.json", "n_sequences 2", "--out"))
    assert snapshot(run) == before


def _poison(run: Path, name: str = "ema.safetensors") -> Path:
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    tensors = load_file(str(latest / name))
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(latest / name))
    return latest / name


def test_eval_with_nan_weights_fails_and_keeps_the_earlier_result(run, tmp_path):
    run = copy_of(run, tmp_path)
    assert cli.main(["eval", str(run), "--max-chunks", "4", "--device", "cpu"]) == 0
    poisoned = _poison(run)
    before = snapshot(run)
    proc = real_cli("eval", str(run), "--max-chunks", "4", "--device", "cpu")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert str(poisoned) in lines[0] and "non-finite" in lines[0] and "--weights raw" in lines[0]
    assert snapshot(run) == before  # eval-test-n4.json untouched, nothing new


def test_eval_giving_nan_writes_nothing(capsys, run, tmp_path, monkeypatch):
    """Finite weights can still give a non-finite figure: exit 1, the earlier result intact."""
    import maskdiff.apps.likelihood as likelihood

    run = copy_of(run, tmp_path)
    assert cli.main(["eval", str(run), "--max-chunks", "4", "--device", "cpu"]) == 0
    before = snapshot(run)
    real = likelihood.evaluate_split
    monkeypatch.setattr(likelihood, "evaluate_split", lambda *a, **k: {**real(*a, **k), "bits_per_token": float("nan")})
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--max-chunks", "4", "--device", "cpu"]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "nan bits/token" in lines[0] and "eval-test-n4.json is unchanged" in lines[0]
    assert snapshot(run) == before


def test_eval_full_disk_is_a_failure_of_the_work(capsys, run, tmp_path, monkeypatch):
    import maskdiff.apps.likelihood as likelihood

    run = copy_of(run, tmp_path)
    before = snapshot(run)

    def full(path, obj, **kw):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(likelihood, "write_json_atomic", full)
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--max-chunks", "2", "--device", "cpu"]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "eval-test-n2.json: No space left on device" in lines[0]
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def short_split_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text8 run whose data file then shrinks: validation and test splits of 20 characters,
    fewer than one chunk of 32."""
    folder = tmp_path_factory.mktemp("short")
    text8 = folder / "text8"
    text8.write_text(("the cat sat on the mat and then it ran " * 60)[:2000])
    out = folder / "run"
    assert cli.main(train_args(out, "--set", "data.corpus=text8", "--set", f"data.path={text8}",
                               "--set", "train.eval_every=0", steps=2)) == 0
    text8.write_text(("the cat sat on the mat " * 30)[:400])
    return out


@pytest.mark.parametrize("split", ["validation", "test"])
def test_eval_split_shorter_than_a_chunk_refused_first(capsys, short_split_run, split):
    before = snapshot(short_split_run)
    refused(capsys, "eval", short_split_run, "--split", split, "--device", "cpu",
            words=("split", "holds 20 tokens", "fewer than one chunk of data.seq_len=32"))
    assert snapshot(short_split_run) == before


def test_plot_elbo_on_a_split_shorter_than_a_chunk(capsys, short_split_run, tmp_path):
    refused(capsys, "plot", short_split_run, "--what", "elbo", "--steps", "2", "--out", tmp_path / "figs",
            "--device", "cpu", words=("holds 20 tokens", "fewer than one chunk"))


def test_eval_read_only_run_says_where_to_write(capsys, run, tmp_path, monkeypatch):
    pretend_read_only(monkeypatch, run)
    before = snapshot(run)
    refused(capsys, "eval", run, "--max-chunks", "2", "--device", "cpu", words=("not writable", "--out FILE"))
    out = tmp_path / "result.json"
    assert cli.main(["eval", str(run), "--max-chunks", "2", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_sequences"] == 2
    assert snapshot(run) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_eval_really_read_only_run(capsys, run, tmp_path):  # pragma: no cover - not run as root
    run = copy_of(run, tmp_path)
    run.chmod(0o555)
    try:
        refused(capsys, "eval", run, "--max-chunks", "2", "--device", "cpu", words=("not writable",))
    finally:
        run.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# sample


@pytest.mark.parametrize("extra, words", [
    (["--length", "0"], ("--length 0", "omit it")),
    (["--num", "0"], ("--num 0",)),
    (["--steps", "-1"], ("--steps -1",)),
    (["--top-k", "0"], ("--top-k 0",)),
    (["--top-p", "2"], ("--top-p 2.0", "(0, 1]")),
    (["--temperature", "nan"], ("--temperature nan", "finite")),
    (["--guidance", "nan"], ("--guidance nan", "finite")),
    (["--infill", "no gap here"], ("--infill 'no gap here'", "no gap '___'")),
    (["--infill", "a ___ b", "--gap-length", "0"], ("--gap-length 0",)),
    (["--infill", "a ___ b", "--gap", ""], ("--gap ''",)),
    (["--infill", "a ___ b", "--prompt", "x"], ("--infill", "--prompt")),
    (["--prompt", "Hello, World!"], ("--prompt 'Hello, World!'", "outside a-z", "--prompt 'hello world '")),
    (["--suffix", "the  end"], ("--suffix", "runs of spaces", "'the end'")),
    (["--infill", "The ___ of"], ("--infill 'The ___ of'", "'T'", "--infill 'the ___ of'")),
    (["--prompt", "x" * 40], ("--prompt/--suffix take 40 of the 32 tokens",)),
    (["--label", "1"], ("text run", "--label")),
    (["--guidance", "2"], ("text run", "--guidance")),
])
def test_sample_bad_requests_refused_before_sampling(capsys, run, extra, words):
    before = snapshot(run)
    line = refused(capsys, "sample", run, "--num", "1", "--steps", "4", "--device", "cpu", *extra, words=words)
    assert "denoiser" not in line
    assert snapshot(run) == before


def test_sample_good_prompts_and_templates_still_work(capsys, run):
    """The checks refuse only what the model cannot read: clean prompts and templates sample."""
    for extra in (["--prompt", "the history of"], ["--suffix", " of the"], ["--infill", "the ___ of the ___"]):
        code, lines = run_cli(capsys, "sample", run, "--num", "1", "--steps", "4", "--device", "cpu",
                              "--gap-length", "4", *extra)
        assert code == 0 and not [ln for ln in lines if ln.startswith("error")], (extra, lines)


def test_sample_out_into_a_missing_folder_refused_before_sampling(capsys, run, tmp_path, monkeypatch):
    import maskdiff.apps.generate as generate

    monkeypatch.setattr(generate, "sample", lambda *a, **k: pytest.fail("sampled before checking --out"))
    target = tmp_path / "missing" / "samples.jsonl"
    refused(capsys, "sample", run, "--num", "1", "--steps", "4", "--out", target,
            words=(str(target.parent), "does not exist", "mkdir -p"))
    assert not target.parent.exists()
    kept = tmp_path / "kept.jsonl"
    kept.write_text("mine\n")
    refused(capsys, "sample", run, "--num", "1", "--steps", "4", "--out", kept, words=("exists", "--out"))
    assert kept.read_text() == "mine\n"


def test_sample_out_is_written_atomically(run, tmp_path, monkeypatch):
    import maskdiff.fileio as fileio

    out = tmp_path / "s.jsonl"
    real = fileio.atomic_write
    seen = []

    def spy(path):
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(fileio, "atomic_write", spy)
    assert cli.main(["sample", str(run), "--num", "2", "--steps", "4", "--device", "cpu", "--out", str(out)]) == 0
    assert seen == [out] and len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]  # no temporary file left


def test_sample_with_nan_weights_names_the_file(capsys, run, tmp_path):
    run = copy_of(run, tmp_path)
    poisoned = _poison(run)
    refused(capsys, "sample", run, "--num", "1", "--steps", "4", "--device", "cpu", words=(str(poisoned),), code=1)


@pytest.mark.parametrize("extra, words", [
    (["--guidance", "nan", "--per-class", "1"], ("--guidance nan", "finite")),
    (["--guidance", "1"], ("--guidance", "--label or --per-class")),
    (["--label", "10"], ("--label 10", "[0, 10)")),
    (["--prompt", "x"], ("image run", "--prompt")),
    (["--length", "8"], ("image run", "--length")),
])
def test_sample_image_run_bad_requests(capsys, image_run, tmp_path, extra, words):
    before = snapshot(image_run)
    refused(capsys, "sample", image_run, "--num", "2", "--steps", "2", "--device", "cpu",
            "--out", tmp_path / "g.png", *extra, words=words)
    assert snapshot(image_run) == before and not (tmp_path / "g.png").exists()


def test_sample_image_run_read_only_says_where_to_write(capsys, image_run, tmp_path, monkeypatch):
    pretend_read_only(monkeypatch, image_run)
    before = snapshot(image_run)
    refused(capsys, "sample", image_run, "--num", "2", "--steps", "2", "--device", "cpu",
            words=("not writable", "--out FILE.png"))
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", str(image_run), "--num", "2", "--steps", "2", "--device", "cpu", "--out", str(grid)]) == 0
    assert grid.is_file() and snapshot(image_run) == before


# ---------------------------------------------------------------------------------------------
# compare

COMPARE_TINY = ["--set", "model.n_layers=1", "--set", "model.d_model=32", "--set", "model.n_heads=2",
                "--set", "data.seq_len=32", "--set", "train.batch_size=8", "--set", "train.eval_every=0",
                "--set", "train.save_every=0", "--set", "optim.warmup_steps=1", "--max-chunks", "4"]


def compare_args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["compare", "--methods", "md4", "--out", str(out), "--set", f"train.steps={steps}", *COMPARE_TINY, *extra]


def test_compare_with_another_budget_refuses_or_retrains(capsys, tmp_path):
    out = tmp_path / "cmp"
    assert cli.main(compare_args(out, 2)) == 0
    table = json.loads((out / "compare-n4.json").read_text())
    assert table["config"]["train"]["steps"] == 2 and (out / "compare-n4.md").is_file()
    before = snapshot(out)
    refused(capsys, *compare_args(out, 3), words=("train.steps=2 (now 3)", "--retrain"))
    assert snapshot(out) == before  # nothing trained, nothing reused under the new label
    # --retrain: the old runs and table are moved aside, not deleted; the new table says 3 steps.
    assert cli.main(compare_args(out, 3, "--retrain")) == 0
    assert json.loads((out / "compare-n4.json").read_text())["config"]["train"]["steps"] == 3
    assert json.loads((out / "md4" / "config.json").read_text())["train"]["steps"] == 3
    old_runs = [p for p in out.iterdir() if p.name.startswith("md4.old-")]
    old_tables = [p for p in out.iterdir() if p.name.startswith("compare-n4.old-") and p.suffix == ".json"]
    assert len(old_runs) == 1 and json.loads((old_runs[0] / "config.json").read_text())["train"]["steps"] == 2
    assert len(old_tables) == 1 and json.loads(old_tables[0].read_text()) == table
    # Another evaluation setting gets its own table; the first one stays as it was.
    first = (out / "compare-n4.json").read_bytes()
    assert cli.main(compare_args(out, 3, "--draws", "2")) == 0
    assert (out / "compare-n4.json").read_bytes() == first
    assert json.loads((out / "compare-K2-n4.json").read_text())["eval"]["draws"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # written atomically
    assert not (out / ".lock").exists()  # the folder's write lock is released


@pytest.mark.parametrize("extra, words", [
    (["--methods", "md4,gpt"], ("--methods md4,gpt", "unknown method gpt")),
    (["--max-chunks", "0"], ("--max-chunks 0",)),
    (["--draws", "0"], ("--draws 0",)),
    (["--set", "train.steps=0"], ("train.steps=0",)),
])
def test_compare_bad_arguments_refused_before_training(capsys, tmp_path, extra, words):
    out = tmp_path / "cmp"
    refused(capsys, "compare", "--out", out, "--set", "train.steps=2", *COMPARE_TINY, *extra, words=words)
    assert not out.exists()


def test_compare_into_a_read_only_folder(capsys, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    out.mkdir()
    pretend_read_only(monkeypatch, out)
    refused(capsys, *compare_args(out, 2), words=("--out", "not writable"))
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# plot


def test_plot_output_folder_checked_first(capsys, run, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    refused(capsys, "plot", run, "--out", afile / "figs", words=("--out", "is a file"))
    refused(capsys, "plot", run, "--batch-size", "0", words=("--batch-size 0",))
    refused(capsys, "plot", run, "--max-chunks", "-1", words=("--max-chunks -1",))
    locked = tmp_path / "locked"
    locked.mkdir()
    pretend_read_only(monkeypatch, locked)
    refused(capsys, "plot", run, "--out", locked, words=("--out", "not writable"))
    assert afile.read_text() == "keep" and list(locked.iterdir()) == []


def test_plot_read_only_run_says_where_to_write(capsys, run, tmp_path, monkeypatch):
    pretend_read_only(monkeypatch, run)
    before = snapshot(run)
    refused(capsys, "plot", run, words=("not writable", "--out DIR"))
    refused(capsys, "plot", run, "--what", "elbo", "--steps", "2", "--out", tmp_path / "figs",
            words=("not writable", "--no-compute"))
    assert cli.main(["plot", str(run), "--what", "curves", "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "training-curves.png").is_file() and snapshot(run) == before


@pytest.mark.parametrize("command", [["zeroshot", "--datasets", "ptb"], ["genppl"]])
def test_other_writers_refuse_a_read_only_run_first(capsys, run, monkeypatch, command):
    pretend_read_only(monkeypatch, run)
    before = snapshot(run)
    refused(capsys, command[0], run, *command[1:], words=("not writable", "copy the run folder"))
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------
# The command line itself


def test_argument_errors_are_one_line(tmp_path):
    proc = real_cli("eval", str(tmp_path), "--batch-size", "many")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: maskdiff eval: argument --batch-size: invalid int value: 'many' (see `maskdiff eval --help`)"]


def test_an_unexpected_error_is_one_line_with_exit_1(capsys, monkeypatch):
    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setitem(cli.HANDLERS, "presets", broken)
    line = refused(capsys, "presets", code=1, words=("internal error, TypeError: unsupported operand", "MASKDIFF_DEBUG=1"))
    assert "Traceback" not in line
    monkeypatch.setenv("MASKDIFF_DEBUG", "1")
    with pytest.raises(TypeError):
        cli.main(["presets"])


def test_exit_code_attribute_decides(capsys, monkeypatch):
    class Diverged(RuntimeError):
        exit_code = 1

    def fail(args):
        raise Diverged("loss was NaN for 5 steps in a row at step 12; resume from step 10 with a lower optim.lr")

    monkeypatch.setitem(cli.HANDLERS, "presets", fail)
    refused(capsys, "presets", code=1, words=("step 12",))
