"""The AR baseline and the comparison table."""

import json
import math

import pytest
import torch

from maskdiff.apps.compare import compare_methods, unigram_estimate
from maskdiff.build import build_model
from maskdiff.config import apply_overrides, get_preset
from maskdiff.data import load_corpus
from maskdiff.evaluate import evaluate_nelbo

TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "data.seq_len=32", "train.batch_size=8",
        "train.eval_every=0", "train.save_every=0", "train.log_every=1", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def wiki():
    return load_corpus("wiki-char")


@pytest.mark.parametrize("method", ["ar", "md4"])
def test_untrained_models_score_log_V(wiki, method):
    """Zero-initialised heads predict uniformly: AR gives exactly log2 V; MD4's bound ≈ log2 V."""
    extra = ["diffusion.method=ar", "model.causal=true", "model.time_conditioning=false"] if method == "ar" else []
    cfg = apply_overrides(get_preset("demo"), [*TINY, *extra, "model.head_init=zero"])
    model = build_model(cfg, 27)
    res = evaluate_nelbo(model, wiki.test[:32 * 256], seq_len=32, batch_size=64, seed=0)
    if method == "ar":
        assert res["bits_per_token"] == pytest.approx(math.log2(27), abs=1e-5)
    else:
        expected = math.log2(27) * (1 - 2e-4) + 2 * 1e-4 * math.log2(27)  # diffusion + recon + prior
        assert abs(res["bits_per_token"] - expected) < 4 * res["stderr"]


def test_ar_model_is_causal_and_uses_bos():
    cfg = apply_overrides(get_preset("demo"), TINY + ["diffusion.method=ar", "model.causal=true",
                                                      "model.time_conditioning=false"])
    model = build_model(cfg, 27)
    torch.nn.init.normal_(model.network.head.weight, std=0.5)
    x = torch.randint(0, 27, (2, 32), generator=torch.Generator().manual_seed(0))
    base = model(x)["nelbo"]
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 27  # changing the last token changes only its own term
    inputs = lambda t: torch.cat([torch.full_like(t[:, :1], 27), t[:, :-1]], 1)  # noqa: E731
    assert torch.equal(model.network(inputs(x))[:, :-1], model.network(inputs(y))[:, :-1])
    assert not torch.equal(base, model(y)["nelbo"])


def test_unigram_estimate_matches_entropy_helper(wiki):
    from maskdiff.data import unigram_entropy_bits

    est = unigram_estimate(wiki.train, wiki.test, 27, 128)
    whole = unigram_entropy_bits(wiki.train, wiki.test[: est["n_sequences"] * 128], 27)
    assert est["bits_per_token"] == pytest.approx(whole, abs=1e-9)
    assert est["ci95"][0] < est["bits_per_token"] < est["ci95"][1]


def test_compare_writes_a_table(tmp_path):
    summary = compare_methods("demo", methods=("ar", "md4", "genmd4"), overrides=TINY + ["train.steps=3"],
                              out_dir=tmp_path, max_chunks=16, progress=False)
    assert set(summary["rows"]) == {"unigram", "ar", "md4", "genmd4"}
    table = (tmp_path / "compare-n16.md").read_text()  # the table names its evaluation settings (-n16)
    for label in ("unigram", "autoregressive", "MD4", "GenMD4"):
        assert label in table
    saved = json.loads((tmp_path / "compare-n16.json").read_text())
    assert saved["budget"]["steps"] == 3
    # Re-running reuses the finished runs instead of training again.
    again = compare_methods("demo", methods=("md4",), overrides=TINY + ["train.steps=3"], out_dir=tmp_path,
                            max_chunks=16, progress=False)
    assert again["rows"]["md4"]["train_seconds"] is None
    # ... and the table keeps the rows of the methods not re-run (same budget, same evaluation).
    assert set(json.loads((tmp_path / "compare-n16.json").read_text())["rows"]) == {"unigram", "ar", "md4", "genmd4"}
