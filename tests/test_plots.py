"""PNG plots of a run folder (maskdiff.apps.plots): each plot renders, and `maskdiff plot` behaves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from PIL import Image

from maskdiff import cli
from maskdiff.apps.checks import UsageError
from maskdiff.apps.likelihood import elbo_vs_steps
from maskdiff.apps.plots import (
    _token_label,
    plot_elbo_vs_steps,
    plot_genmd4_exponents,
    plot_training_curves,
)
from maskdiff.checkpoint import RunFolderError
from maskdiff.cli import cmd_plot
from maskdiff.runs import read_metrics

TINY = ["--no-progress", "--set", "train.steps=6", "--set", "model.n_layers=1", "--set", "model.d_model=32",
        "--set", "model.n_heads=2", "--set", "data.seq_len=32", "--set", "train.batch_size=8",
        "--set", "train.eval_every=3", "--set", "train.eval_batches=1", "--set", "train.log_every=1"]


def _train(out: Path, *extra: str) -> Path:
    assert cli.main(["train", "--preset", "demo", "--out", str(out), *TINY, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def md4_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("plots") / "md4")


@pytest.fixture(scope="module")
def genmd4_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("plots") / "genmd4", "--set", "diffusion.method=genmd4")


def _check_png(path: Path, min_size: tuple[int, int] = (300, 200)) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        lo, hi = im.convert("L").getextrema()
        assert lo < hi  # something was drawn


def _plot_parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def test_read_metrics_keeps_the_last_record_of_a_repeated_step(tmp_path: Path) -> None:
    lines = [
        {"step": 1, "split": "train", "bits_per_token": 5.0},
        {"step": 2, "split": "train", "bits_per_token": 4.0},
        {"step": 2, "split": "validation", "bits_per_token": 4.5, "stderr": 0.1},
        {"step": 2, "split": "train", "bits_per_token": 3.9},  # logged again after a resume
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "spl'  # truncated last line
    (tmp_path / "metrics.jsonl").write_text(text)
    m = read_metrics(tmp_path)
    assert [r["step"] for r in m["train"]] == [1, 2] and m["train"][1]["bits_per_token"] == 3.9
    assert [r["bits_per_token"] for r in m["validation"]] == [4.5]


def test_training_curves(md4_run: Path, tmp_path: Path) -> None:
    out = plot_training_curves(md4_run, tmp_path / "curves.png")
    _check_png(out)
    # With an evaluation file (unigram line, final point) and a log-scale x axis.
    (md4_run / "eval-test.json").write_text(json.dumps(
        {"bits_per_token": 4.6, "stderr": 0.05, "ci95": [4.5, 4.7], "n_sequences": 8, "step": 6, "split": "test",
         "unigram_bits_per_token": 4.1}))
    try:
        _check_png(plot_training_curves(md4_run, tmp_path / "curves-log.png", log_x=True))
    finally:
        (md4_run / "eval-test.json").unlink()


def test_genmd4_exponents(genmd4_run: Path, md4_run: Path, tmp_path: Path) -> None:
    _check_png(plot_genmd4_exponents(genmd4_run, tmp_path / "w.png"))
    _check_png(plot_training_curves(genmd4_run, tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="GenMD4"):
        plot_genmd4_exponents(md4_run, tmp_path / "no.png")


def test_token_labels() -> None:
    assert _token_label(" ", 0, show_id=False) == "␣"
    assert _token_label(" the", 262, show_id=True) == "␣the (262)"
    assert _token_label("\n\n", 628, show_id=True) == "↵↵ (628)"
    assert _token_label("$", 3, show_id=False) == r"\$"  # not read as mathtext


def test_genmd4_exponents_large_vocabulary(genmd4_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPT-2-sized vocabulary: top/bottom tokens and a histogram (a stand-in model, to stay fast)."""
    import types

    import torch

    import maskdiff.runs

    run = tmp_path / "gpt2-run"
    run.mkdir()
    config = json.loads((genmd4_run / "config.json").read_text())
    config["data"]["corpus"] = "wiki-gpt2"
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text((genmd4_run / "metrics.jsonl").read_text())
    w = torch.exp(0.3 * torch.randn(50257, generator=torch.Generator().manual_seed(0)))

    class Tok:
        def decode(self, ids: list[int]) -> str:
            return {0: " the", 1: "\n"}.get(ids[0], f"t{ids[0]}")

    schedule = types.SimpleNamespace(exponents=w, init_exponent=1.0)
    fake = types.SimpleNamespace(model=types.SimpleNamespace(schedule=schedule), tokenizer=Tok(), weights="ema", step=6)
    monkeypatch.setattr(maskdiff.runs, "load", lambda *a, **k: fake)
    _check_png(plot_genmd4_exponents(run, tmp_path / "w.png"))


def test_elbo_vs_steps_computes_missing_points_paired(md4_run: Path, tmp_path: Path) -> None:
    out = plot_elbo_vs_steps(md4_run, tmp_path / "elbo.png", steps=(2, 20), max_chunks=8, batch_size=8, device="cpu")
    _check_png(out)
    # The file names say what was computed: the first 8 chunks (-n8), batch 8 (-b8).
    names = ("eval-test-T2-n8-b8.json", "eval-test-T20-n8-b8.json", "eval-test-n8-b8.json")
    for name in names:
        rec = json.loads((md4_run / name).read_text())
        assert rec["n_sequences"] == 8 and rec["seed"] == 0 and rec["step"] == 6 and rec["batch_size"] == 8
    assert not (md4_run / "eval-test.json").exists()  # the whole-split name is not taken by a part
    # A file of the user's that does not match is left alone; the matching figure goes to plots/cache/.
    user = md4_run / "eval-test-T20-n8-b8.json"
    mine = json.loads(user.read_text())
    user.write_text(json.dumps({**mine, "n_sequences": 999}))
    points = elbo_vs_steps(md4_run, (20,), max_chunks=8, batch_size=8, device="cpu")
    assert json.loads(user.read_text())["n_sequences"] == 999
    assert points[20]["bits_per_token"] == pytest.approx(mine["bits_per_token"])
    assert list((md4_run / "plots" / "cache").glob("eval-test-T20-n8-seed0-step6-b8.json"))
    # Nothing to compute: plots what exists.
    _check_png(plot_elbo_vs_steps(md4_run, tmp_path / "elbo2.png", steps=(2, 20), compute_missing=False))
    for name in names:
        (md4_run / name).unlink()


def test_cli_plot(md4_run: Path, genmd4_run: Path, tmp_path: Path) -> None:
    parser = _plot_parser()
    # Default: RUN_DIR/plots/, curves (+ exponents for GenMD4); regenerating replaces our own files.
    assert cmd_plot(parser.parse_args(["plot", str(genmd4_run)])) == 0
    assert cmd_plot(parser.parse_args(["plot", str(genmd4_run)])) == 0
    made = sorted(p.name for p in (genmd4_run / "plots").glob("*.png"))
    assert made == ["genmd4-exponents.png", "training-curves.png"]
    for name in made:
        _check_png(genmd4_run / "plots" / name)

    # A folder of the user's: an existing file is never replaced.
    out = tmp_path / "figs"
    out.mkdir()
    (out / "training-curves.png").write_bytes(b"mine")
    assert cmd_plot(parser.parse_args(["plot", str(md4_run), "--what", "curves", "--out", str(out)])) == 0
    assert (out / "training-curves.png").read_bytes() == b"mine"
    _check_png(out / "training-curves-2.png")

    # --out naming a file, unknown --what, exponents of an MD4 run: refused.
    target = tmp_path / "afile"
    target.write_text("keep")
    with pytest.raises(UsageError, match="not a folder"):
        cmd_plot(parser.parse_args(["plot", str(md4_run), "--out", str(target)]))
    assert target.read_text() == "keep"
    with pytest.raises(UsageError, match="--what"):
        cmd_plot(parser.parse_args(["plot", str(md4_run), "--what", "curvez"]))
    with pytest.raises(UsageError, match="GenMD4"):
        cmd_plot(parser.parse_args(["plot", str(md4_run), "--what", "exponents"]))
    with pytest.raises(RunFolderError, match="not a run folder"):
        cmd_plot(parser.parse_args(["plot", str(tmp_path / "nothing")]))


def test_cli_main_plot_when_wired(md4_run: Path, tmp_path: Path) -> None:
    choices = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if "plot" not in choices:
        pytest.skip("`maskdiff plot` is not wired into maskdiff.cli yet")
    out = tmp_path / "via-main"
    assert cli.main(["plot", str(md4_run), "--what", "curves", "--out", str(out)]) == 0
    _check_png(out / "training-curves.png")


def test_elbo_plot_on_an_image_run(tmp_path: Path) -> None:
    """`maskdiff plot RUN --what elbo` on a pixel run: the run's own data (images, not a text
    corpus) is loaded through the one data function and the images are counted as sequences."""
    out = tmp_path / "digits"
    sets = ["data.corpus=digits", "data.seq_len=64", "model.architecture=unet", "model.d_model=16",
            "model.n_heads=2", "model.unet_channel_mult=1,2", "model.unet_res_blocks=1", "train.steps=4",
            "train.batch_size=8", "train.eval_every=0", "train.save_every=4", "train.num_threads=1",
            "model.class_conditional=false"]
    args = ["train", "--preset", "mnist-md4", "--out", str(out), "--no-progress"]
    for item in sets:
        args += ["--set", item]
    assert cli.main(args) == 0
    figs = tmp_path / "figs"
    assert cli.main(["plot", str(out), "--what", "elbo", "--steps", "2,8", "--max-chunks", "16",
                     "--batch-size", "16", "--device", "cpu", "--out", str(figs)]) == 0
    _check_png(figs / "elbo-vs-steps-test.png")
    t2 = json.loads((out / "eval-test-T2-n16-b16.json").read_text())
    cont = json.loads((out / "eval-test-n16-b16.json").read_text())
    assert t2["n_sequences"] == cont["n_sequences"] == 16
    assert "histogram_bits_per_dim" in cont  # evaluated as images
    assert t2["num_steps"] == 2 and 0 < t2["bits_per_token"] < 8.0  # 8 bits/dim = uniform over 256 levels


@pytest.mark.parametrize("data, unit", [
    ({"corpus": "wiki-char"}, "bits per character"),
    ({"corpus": "wiki-gpt2"}, "bits per token"),
    ({"corpus": "files"}, "bits per byte"),
    ({"corpus": "files", "tokenizer": "byte"}, "bits per byte"),
    ({"corpus": "files", "tokenizer": "char"}, "bits per character"),
    ({"corpus": "files", "tokenizer": "gpt2"}, "bits per token"),
    ({"corpus": "files", "tokenizer": "/data/tokenizer.json"}, "bits per token"),
])
def test_axis_unit_follows_the_runs_tokens(data: dict, unit: str) -> None:
    from maskdiff.apps.plot_common import _unit

    assert _unit({"data": data}) == unit
