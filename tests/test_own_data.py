"""Training on one's own files (data.corpus=files): tokenizers, splits, records, the stored vocabulary."""

from __future__ import annotations

import gzip
import importlib.util
import json

import numpy as np
import pytest
import torch

from maskdiff import load
from maskdiff.apps.generate import generate_text
from maskdiff.apps.likelihood import run_eval
from maskdiff.build import run_data
from maskdiff.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, apply_overrides
from maskdiff.data import (
    ByteTokenizer,
    DataError,
    OutOfVocabularyError,
    load_data,
    load_files,
    read_run_tokenizer,
)
from maskdiff.data.files import assign_splits
from maskdiff.data.vocab import tokenizer_from_dict
from maskdiff.training import train

UTF8 = "héllo wörld — 日本語 🎉 Ω≈ç√\n\ttabs and\r\nCRLF\x00nul \u2028 sep\n"


def _write_docs(folder, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(8))
        (folder / f"mod{i:02d}.py").write_text(body, encoding="utf-8")
    return folder


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _equations(n, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 100, n), rng.integers(0, 100, n)
    return [f"{x}+{y}={x + y}" for x, y in zip(a, b)]


# ---------------------------------------------------------------------------------------------
# Tokenizers round-trip text exactly


def test_byte_tokenizer_round_trips_any_utf8():
    tok = ByteTokenizer()
    ids = tok.encode(UTF8)
    assert ids == list(UTF8.encode("utf-8")) and max(ids) < 255 and tok.vocab_size == 256
    assert tok.decode(ids) == UTF8
    assert tok.decode(torch.tensor(ids)) == UTF8  # tensors and arrays decode alike
    # 0xFF (never in UTF-8) ends a record: record decoding cuts there; documents show the separator
    assert ByteTokenizer(records=True).decode(ids[:5] + [255, 65, 255]) == UTF8.encode()[:5].decode("utf-8", "replace")
    assert tok.decode([104, 105, 255, 111]) == "hi<|endoftext|>o"


def test_char_vocabulary_round_trips_training_alphabet_and_names_unknown_characters(tmp_path):
    src = _write_docs(tmp_path / "src")
    data = load_files(src, tokenizer="char", cache_dir=tmp_path / "cache", progress=False)
    tok = data.tokenizer
    train_text = tok.decode(data.train)
    assert set(tok.symbols) == set(train_text.replace("<|endoftext|>", ""))  # built from the training split
    text = "def f(x):\n    return x * 3 + 1\n"
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(OutOfVocabularyError, match=r"holds 2 character\(s\) .*: 'é' \(U\+00E9\), 'Ω' \(U\+03A9\);"):
        tok.encode("def Ω(é):\n    return x")
    # documents are joined with the end token: one separator fewer than documents per split
    m = data.metadata
    assert int((np.asarray(data.train) == tok.eos_id).sum()) == m["documents"]["train"] - 1


def test_hf_tokenizer_round_trips(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [UTF8, "def f(x):\n    return x + 1\n"] * 20
    hf.train_from_iterator(corpus, trainer)
    file = tmp_path / "tok" / "tokenizer.json"
    file.parent.mkdir()
    hf.save(str(file))
    src = _write_docs(tmp_path / "src", n=5)
    data = load_files(src, tokenizer=str(file.parent), cache_dir=tmp_path / "cache", progress=False)
    tok = data.tokenizer
    assert tok.eos_id == hf.token_to_id("<|endoftext|>") and data.vocab_size == hf.get_vocab_size()
    for text in (UTF8, "def g(y):\n    return y * 2\n"):
        assert tok.decode(tok.encode(text)) == text
    assert int((np.asarray(data.train) == tok.eos_id).sum()) == data.metadata["documents"]["train"] - 1
    stored = json.loads(json.dumps(data.run_files()["tokenizer.json"]))  # what a run folder keeps
    again = tokenizer_from_dict(stored)
    assert again.encode(UTF8) == tok.encode(UTF8) and again.eos_id == tok.eos_id


# ---------------------------------------------------------------------------------------------
# Splits


def test_document_splits_are_deterministic_and_disjoint(tmp_path):
    lines = _equations(400) + ["1+1=2"] * 30  # duplicates must stay in one split
    f = _write_lines(tmp_path / "eq.txt", lines)
    a = load_files(f, tokenizer="char", records="lines", seq_len=12, cache_dir=tmp_path / "c1", progress=False)
    b = load_files(f, tokenizer="char", records="lines", seq_len=12, cache_dir=tmp_path / "c2", progress=False)
    rows = {}
    for split in ("train", "validation", "test"):
        assert np.array_equal(a.split(split), b.split(split))  # built twice, the same
        rows[split] = [a.tokenizer.decode(r) for r in np.asarray(a.split(split)).reshape(-1, 12)]
    assert sum(map(len, rows.values())) == len(lines)
    sets = {s: set(v) for s, v in rows.items()}
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"])
    assert not (sets["validation"] & sets["test"])
    assert sorted(rows["train"] + rows["validation"] + rows["test"]) == sorted(lines)
    assert len(rows["validation"]) >= 0.04 * len(lines) and len(rows["test"]) >= 0.04 * len(lines)
    # the rule itself: 20 distinct hashes -> 1 validation, 1 test; equal hashes never parted
    assert np.bincount(assign_splits(np.arange(20, dtype=np.uint64) * 7919), minlength=3).tolist() == [18, 1, 1]
    tied = assign_splits(np.array([5, 5, 5, 9, 9, 1, 2, 3, 4, 6, 7, 8], dtype=np.uint64))
    assert len(set(tied[:3])) == 1 and len(set(tied[3:5])) == 1


def test_globs_folders_and_gzip_read_the_same_text(tmp_path):
    src = _write_docs(tmp_path / "src", n=4)
    for f in sorted(src.glob("*.py"))[:2]:  # two of the files compressed: same documents
        with gzip.open(f.with_suffix(".py.gz"), "wt", encoding="utf-8") as g:
            g.write(f.read_text())
        f.unlink()
    folder = load_files(src, cache_dir=tmp_path / "c", progress=False)
    plain = _write_docs(tmp_path / "plain", n=4)
    glob = load_files(str(plain / "*.py"), cache_dir=tmp_path / "c", progress=False)
    assert folder.metadata["n_files"] == glob.metadata["n_files"] == 4
    for split in ("train", "validation", "test"):
        assert np.array_equal(folder.split(split), glob.split(split))


def test_empty_tiny_and_non_utf8_corpora_fail_clearly(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_data("files", seq_len=16, path=empty, cache_dir=tmp_path / "c")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n")
    with pytest.raises(DataError, match=r"split holds \d+ tokens, fewer than one chunk of data.seq_len=16"):
        load_data("files", seq_len=16, path=tiny, cache_dir=tmp_path / "c")
    two = _write_lines(tmp_path / "two.txt", ["1+1=2", "2+2=4"])
    with pytest.raises(DataError, match="at least 3 non-empty lines"):
        load_data("files", seq_len=16, path=two, records="lines", tokenizer="char", cache_dir=tmp_path / "c")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(byte b'\\xe9' at offset 3"):
        load_data("files", seq_len=2, path=latin, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="set data.path"):
        load_data("files", seq_len=16, cache_dir=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="data.tokenizer='nope'"):
        load_data("files", seq_len=16, path=tiny, tokenizer="nope", cache_dir=tmp_path / "c")


def test_settings_apply_to_files_only():
    base = RunConfig()
    with pytest.raises(ValueError, match="data.tokenizer='char' applies only to data.corpus=files"):
        apply_overrides(base, ["data.tokenizer=char"])
    with pytest.raises(ValueError, match="data.records='rows': expected lines"):
        apply_overrides(base, ["data.corpus=files", "data.records=rows"])
    cfg = apply_overrides(base, ["data.corpus=files", "data.records=jsonl:smiles", "data.tokenizer=char"])
    assert (cfg.data.records, cfg.data.tokenizer) == ("jsonl:smiles", "char")


# ---------------------------------------------------------------------------------------------
# Records


def test_records_are_padded_rows_and_too_long_ones_are_an_error(tmp_path):
    lines = _equations(60)
    f = tmp_path / "eq.jsonl"
    f.write_text("".join(json.dumps({"text": s, "n": i}) + "\n" for i, s in enumerate(lines)))
    data = load_files(f, tokenizer="char", records="jsonl:text", seq_len=10, cache_dir=tmp_path / "c", progress=False)
    tok = data.tokenizer
    rows = np.asarray(data.train).reshape(-1, 10)
    for row in rows:
        n = int(np.argmax(row == tok.eos_id))
        assert n > 0 and (row[n:] == tok.eos_id).all()  # the record, then end tokens to the end of the row
    x, _ = data.draw(data.shard_for(0, 2, 10), 16, 10, torch.Generator().manual_seed(0))
    assert x.shape == (16, 10) and all(tok.decode(r) in lines for r in x)  # whole records only
    lengths = data.metadata["record_lengths"]["train"]
    n_chars = [len(tok.decode(r)) for r in rows]  # one token per character
    assert lengths == {"min": min(n_chars), "mean": pytest.approx(np.mean(n_chars)), "max": max(n_chars)}
    assert max(n_chars) == 9  # e.g. "56+78=134": the error below names it
    with pytest.raises(DataError, match=r"do not fit data.seq_len=7 .*has 9 tokens\): set data.seq_len to at least 10"):
        load_files(f, tokenizer="char", records="jsonl:text", seq_len=7, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(DataError, match=r"eq.jsonl:1 has no string field 'smiles'"):
        load_files(f, tokenizer="char", records="jsonl:smiles", seq_len=10, cache_dir=tmp_path / "c", progress=False)


# ---------------------------------------------------------------------------------------------
# The run folder keeps the vocabulary; loading, sampling and evaluation use it


def _tiny_run_config(path, **data):
    return RunConfig(
        name="own", data=DataConfig(corpus="files", path=str(path), **data),
        model=ModelConfig(n_layers=1, d_model=32, n_heads=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=1, ema_decay=0.9),
        train=TrainConfig(steps=3, batch_size=8, log_every=1, eval_every=0, save_every=0, device="cpu",
                          num_threads=1),
    )


def test_stored_vocabulary_is_the_one_a_loaded_run_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDIFF_CACHE", str(tmp_path / "cache"))
    f = _write_lines(tmp_path / "eq.txt", _equations(300))
    cfg = _tiny_run_config(f, tokenizer="char", records="lines", seq_len=10)
    train(cfg, tmp_path / "run", progress=False)
    stored = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert stored["kind"] == "char" and stored["records"] and set(stored["symbols"]) == set("0123456789+=")
    run = load(tmp_path / "run")
    assert run.tokenizer.symbols == tuple(stored["symbols"]) and run.model.vocab_size == run.tokenizer.vocab_size
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert sum(meta["files"]["documents"].values()) == 300

    # The files change (new characters): a fresh load builds another vocabulary, the run keeps its own.
    with open(f, "a") as out:
        out.write("".join(f"{i}*{i}={i * i}\n" for i in range(10)))
    assert run_data(cfg).tokenizer.vocab_size == run.tokenizer.vocab_size + 1  # '*' is new
    again = run_data(cfg, tmp_path / "run")
    assert again.tokenizer.to_dict() == read_run_tokenizer(tmp_path / "run").to_dict()
    assert again.vocab_size == run.tokenizer.vocab_size
    assert sum(again.metadata["unknown"].values()) == 10  # each new line's '*' read as <unk>
    assert load(tmp_path / "run").tokenizer.symbols == run.tokenizer.symbols
    # --resume encodes with the stored vocabulary too (a rebuilt one would change vocab_size: refused)
    train(apply_overrides(cfg, ["train.steps=4"]), tmp_path / "run", resume=True, progress=False)
    assert load(tmp_path / "run").step == 4

    # Prompts outside the vocabulary are refused naming the characters; samples stop at the end token.
    with pytest.raises(OutOfVocabularyError, match=r"'\*' \(U\+002A\)"):
        generate_text(run, num=2, steps=4, prompt="3*", device="cpu", progress=False)
    if importlib.util.find_spec("fastapi") is not None:  # the server refuses them with a 422 naming the field
        from maskdiff.apps.serve.schemas import ApiError, GenerateRequest
        from maskdiff.apps.serve.service import ModelService

        service = ModelService(run)
        for field_name, body in (("prompt", {"prompt": "3*"}), ("suffix", {"suffix": "*1"}),
                                 ("infill", {"infill": "1*___", "gap_length": 2})):
            with pytest.raises(ApiError, match=r"'\*' \(U\+002A\)") as refused:
                service.prepare(GenerateRequest(num_samples=1, steps=4, **body))
            assert (refused.value.status, refused.value.field) == (422, field_name)
        service.close()
    texts, _ = generate_text(run, num=4, steps=10, prompt="12+", device="cpu", progress=False)
    assert all(t.startswith("12+") and "<|endoftext|>" not in t and len(t) <= 10 for t in texts)
    result = run_eval(tmp_path / "run", split="test", batch_size=16, device="cpu", progress=False)
    assert result["n_sequences"] == len(again.test) // 10 and np.isfinite(result["bits_per_token"])


def test_byte_run_on_documents_samples_and_infills(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDIFF_CACHE", str(tmp_path / "cache"))
    src = _write_docs(tmp_path / "src", n=6)
    train(_tiny_run_config(src / "*.py", seq_len=32), tmp_path / "run", progress=False)
    run = load(tmp_path / "run")
    assert isinstance(run.tokenizer, ByteTokenizer) and not run.tokenizer.records
    texts, _ = generate_text(run, num=1, steps=8, infill="def f(x):\n___\n    return y\n", gap_length=6,
                             device="cpu", progress=False)
    assert texts[0].startswith("def f(x):\n") and texts[0].endswith("\n    return y\n")
    (tmp_path / "run" / "tokenizer.json").unlink()
    with pytest.raises(Exception, match="tokenizer.json is missing"):
        load(tmp_path / "run")
