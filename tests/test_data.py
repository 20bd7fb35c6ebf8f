"""maskdiff.data: tokenizers, corpora (wiki-char, wiki-gpt2, text8, HF local files), batching."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports `datasets`
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import inspect
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import maskdiff.data as md
from maskdiff.data import tokenizers as tokmod
from maskdiff.data._cache import sha256_file
from maskdiff.data.wiki import build_wiki_char, read_wiki_extracts, wiki_summaries_path

# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("maskdiff-cache")


@pytest.fixture(scope="session")
def wiki_char(data_cache):
    return md.load_corpus("wiki-char", cache_dir=data_cache)


@pytest.fixture(scope="session")
def wiki_gpt2(data_cache):
    return md.load_corpus("wiki-gpt2", cache_dir=data_cache, progress=False)


@pytest.fixture
def fresh_gpt2_cache():
    """Clear the lru_cache around tests that monkeypatch how the encoding is built."""
    md.gpt2_tokenizer.cache_clear()
    yield
    md.gpt2_tokenizer.cache_clear()


# --------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------


def test_char_tokenizer_ids_and_round_trip():
    tok = md.CharTokenizer()
    assert tok.vocab_size == 27 and tok.name == "char27"
    assert tok.encode(" az") == [0, 1, 26]
    text = "the quick brown fox jumps over the lazy dog "
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.uint8)) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert isinstance(tok, md.Tokenizer) and isinstance(md.GPT2Tokenizer(), md.Tokenizer)


@pytest.mark.parametrize("bad", ["Hello", "caf\u00e9", "two\nlines", "r2d2"])
def test_char_tokenizer_rejects_non_text8(bad):
    with pytest.raises(ValueError, match="normalize_text8"):
        md.CharTokenizer().encode(bad)


def test_char_tokenizer_decode_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        md.CharTokenizer().decode([1, 27])


def test_normalize_text8_rules():
    assert md.normalize_text8("In 1984, Orwell!") == "in one nine eight four orwell "
    assert md.normalize_text8("A--B\t\nC  d") == "a b c d"
    assert md.normalize_text8("0") == " zero "
    assert md.normalize_text8("Caf\u00e9 na\u00efve") == "caf na ve"
    assert md.CharTokenizer().encode("X1", normalize=True) == md.CharTokenizer().encode("x one ")


def test_gpt2_hello_world_and_round_trip():
    enc = md.gpt2_tokenizer()
    assert enc.encode("Hello world!") == [15496, 995, 0]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert md.gpt2_tokenizer() is enc  # lru_cache
    tok = md.GPT2Tokenizer()
    assert (tok.vocab_size, tok.eot_id, tok.name) == (50257, 50256, "gpt2")
    text = "Masked diffusion \u2014 na\u00efve caf\u00e9, 12345 tokens.\n\tEnd \U0001f600"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(np.array(tok.encode(text), dtype=np.uint16)) == text
    # Special-token text is ordinary text; only the packer inserts id 50256.
    assert 50256 not in tok.encode("a<|endoftext|>b")


def test_gpt2_ranks_file_is_r50k_base():
    from tiktoken_ext import openai_public

    path = tokmod.whisper_gpt2_ranks_path()
    assert path is not None and path.name == "gpt2.tiktoken"
    assert sha256_file(path) == md.GPT2_RANKS_SHA256
    # tiktoken pins the same digest for r50k_base.tiktoken: identical content.
    assert md.GPT2_RANKS_SHA256 in inspect.getsource(openai_public.r50k_base)
    assert tokmod.GPT2_PAT_STR == openai_public.r50k_pat_str


def test_gpt2_checksum_mismatch_is_an_error(monkeypatch, fresh_gpt2_cache):
    monkeypatch.setattr(tokmod, "GPT2_RANKS_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        tokmod.gpt2_tokenizer()


def test_gpt2_missing_file_and_failed_fallback(monkeypatch, fresh_gpt2_cache):
    monkeypatch.setattr(tokmod, "whisper_gpt2_ranks_path", lambda: None)

    def offline(name):
        raise ConnectionError("offline")

    monkeypatch.setattr(tokmod.tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="openai-whisper"):
        tokmod.gpt2_tokenizer()


# --------------------------------------------------------------------------------------
# wiki-char / wiki-gpt2
# --------------------------------------------------------------------------------------


def test_wiki_char_sizes_and_ids(wiki_char):
    s = wiki_char
    assert (s.name, s.vocab_size) == ("wiki-char", 27)
    sizes = s.sizes()
    assert sum(sizes.values()) == md.WIKI_CHAR_TOTAL == 4_940_385
    assert sizes == {"train": 4_446_346, "validation": 247_019, "test": 247_020}
    assert sizes["test"] == md.WIKI_CHAR_TEST
    for split in md.SPLIT_NAMES:
        arr = s.split(split)
        assert arr.dtype == np.uint8 and int(arr.max()) < 27
    assert "4,940,385" in s.summary()


def test_wiki_char_follows_text8_rules(wiki_char):
    extracts = read_wiki_extracts()
    assert len(extracts) == 10_033
    text = wiki_char.tokenizer.decode(wiki_char.train[:200])
    assert text.startswith(" two zero th century classical music is western art music")
    assert "  " not in wiki_char.tokenizer.decode(wiki_char.test)
    # Building the first two extracts alone gives a prefix of the full stream.
    head = build_wiki_char(extracts[:2])
    assert np.array_equal(head[:-1], wiki_char.train[: len(head) - 1])


def test_wiki_char_test_entropy(wiki_char):
    h = md.unigram_entropy_bits(wiki_char.test, wiki_char.test, 27, smoothing=0.0)
    assert abs(h - 4.12) < 0.05


def test_wiki_char_round_trip(wiki_char):
    tok = wiki_char.tokenizer
    chunk = wiki_char.validation[:5000]
    assert np.array_equal(tok.encode_array(tok.decode(chunk)), chunk)


def test_wiki_char_second_load_hits_cache(wiki_char, data_cache):
    again = md.load_corpus("wiki-char", cache_dir=data_cache)
    assert again.metadata["from_cache"] and not wiki_char.metadata["from_cache"]
    assert np.array_equal(again.test, wiki_char.test)
    assert not list(data_cache.glob(".*.tmp"))  # atomic writes leave no temp files


def test_wiki_gpt2(wiki_gpt2):
    s = wiki_gpt2
    assert (s.vocab_size, s.train.dtype) == (50257, np.uint16)
    n = sum(s.sizes().values())
    a, b = md.split_90_5_5(n)
    assert (len(s.train), len(s.validation), len(s.test)) == (a, b - a, n - b)
    stream = np.concatenate([s.train, s.validation, s.test])
    assert int((stream == 50256).sum()) == 10_033 - 1  # separators between documents
    first = read_wiki_extracts()[0]
    assert s.tokenizer.decode(stream[: int(np.argmax(stream == 50256))]) == first


def test_wiki_missing_distribution_message(tmp_path):
    with pytest.raises(FileNotFoundError):
        md.load_corpus("wiki-char", path=tmp_path / "nope.json", cache_dir=tmp_path)
    assert wiki_summaries_path().name == "summaries_en-us.json"


# --------------------------------------------------------------------------------------
# text8
# --------------------------------------------------------------------------------------


def _text8_content(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = []
    total = 0
    while total < n:
        w = "".join(rng.choice(letters, size=int(rng.integers(1, 9))))
        words.append(w)
        total += len(w) + 1
    return " " + " ".join(words)[: n - 1]


@pytest.fixture
def text8_files(tmp_path):
    content = _text8_content(10_007)
    plain = tmp_path / "text8"
    plain.write_text(content, encoding="ascii", newline="")
    zdir = tmp_path / "zipped"
    zdir.mkdir()
    with zipfile.ZipFile(zdir / "text8.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", content)
    return content, plain, zdir / "text8.zip"


def test_text8_plain_and_zip(text8_files):
    content, plain, zipped = text8_files
    a = md.load_corpus("text8", path=plain)
    b = md.load_corpus("text8", path=zipped)
    c = md.load_corpus("text8", path=zipped.parent)  # directory holding text8.zip
    assert a.sizes() == {"train": 9006, "validation": 500, "test": 501}
    for split in md.SPLIT_NAMES:
        assert np.array_equal(a.split(split), b.split(split))
        assert np.array_equal(a.split(split), c.split(split))
    stream = np.concatenate([a.train, a.validation, a.test])
    assert a.tokenizer.decode(stream) == content


def test_split_90_5_5_is_standard_for_full_text8():
    assert md.split_90_5_5(100_000_000) == (90_000_000, 95_000_000)


@pytest.mark.parametrize("bad", ["hello World", "hello world\n", "caf\u00e9 ok"])
def test_text8_bad_content(tmp_path, bad):
    f = tmp_path / "text8"
    f.write_bytes(bad.encode("utf-8"))
    with pytest.raises(ValueError, match="not in text8 format.*offset"):
        md.load_corpus("text8", path=f)


def test_text8_missing_file_says_where_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="mattmahoney.net/dc/text8.zip"):
        md.load_corpus("text8", path=tmp_path / "text8.zip")
    with pytest.raises(FileNotFoundError, match="cannot be fetched automatically"):
        md.load_corpus("text8", cache_dir=tmp_path)


def test_text8_zip_without_text8_member(tmp_path):
    z = tmp_path / "text8.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.txt", "abc")
        zf.writestr("b.txt", "def")
    with pytest.raises(ValueError, match="without a 'text8' member"):
        md.load_corpus("text8", path=z)


# --------------------------------------------------------------------------------------
# Hugging Face datasets (local files only)
# --------------------------------------------------------------------------------------

DOCS = [
    f"Document {i}: "
    + " ".join(["masked diffusion", "tokens", "caf\u00e9", str(i * 37)] * (1 + i % 7))
    for i in range(120)
]


def _expected_stream(docs):
    tok = md.GPT2Tokenizer()
    return md.pack_documents([tok.encode(d) for d in docs if d], 50256)


def _write_jsonl(path, docs, extra=True):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d, "meta": "x"} if extra else {"text": d}) + "\n")


def _stream(s):
    return np.concatenate([s.train, s.validation, s.test])


HF_KW = {"val_fraction": 0.1, "test_fraction": 0.1, "progress": False}


def test_hf_jsonl_packing_and_cache(tmp_path, monkeypatch):
    src = tmp_path / "docs.jsonl"
    _write_jsonl(src, DOCS)
    cache = tmp_path / "cache"
    s = md.load_corpus("hf", path=src, cache_dir=cache, **HF_KW)
    assert not s.metadata["from_cache"] and s.metadata["n_documents"] == len(DOCS)
    assert s.vocab_size == 50257 and s.train.dtype == np.uint16
    assert isinstance(s.train, np.memmap)
    stream = _stream(s)
    assert np.array_equal(stream, _expected_stream(DOCS))
    assert int((stream == 50256).sum()) == len(DOCS) - 1
    # Split points sit on document boundaries and follow the fractions.
    n = len(stream)
    assert s.validation[0] == 50256 and s.test[0] == 50256
    assert n - len(s.test) - len(s.validation) >= int(0.8 * n) and len(s.test) <= int(0.1 * n)
    assert abs(len(s.test) - 0.1 * n) < 0.03 * n

    import datasets

    def no_reload(*a, **k):
        raise AssertionError("a cache hit must not call datasets.load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_reload)
    again = md.load_corpus("hf", path=src, cache_dir=cache, **HF_KW)
    assert again.metadata["from_cache"] and again.metadata["cache_file"] == s.metadata["cache_file"]
    for split in md.SPLIT_NAMES:  # deterministic split
        assert np.array_equal(again.split(split), s.split(split))
    assert not [p for p in cache.rglob("*.tmp")]


def test_hf_parquet_glob_and_builder_prefix(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"text": DOCS[:60], "n": list(range(60))}), d / "part-000.parquet")
    pq.write_table(pa.table({"text": DOCS[60:], "n": list(range(60))}), d / "part-001.parquet")
    s = md.load_corpus("hf", path=str(d / "*.parquet"), cache_dir=tmp_path / "c", **HF_KW)
    assert np.array_equal(_stream(s), _expected_stream(DOCS))
    # Same documents through a jsonl file with an explicit builder: same tokens.
    src = tmp_path / "docs.data"
    _write_jsonl(src, DOCS, extra=False)
    j = md.load_corpus("hf:json", path=src, cache_dir=tmp_path / "c", **HF_KW)
    assert np.array_equal(_stream(j), _stream(s))
    assert j.sizes() == s.sizes()


def test_hf_text_files_saved_dataset_and_preset(tmp_path):
    import datasets

    d = tmp_path / "txt"
    d.mkdir()
    for i, doc in enumerate(DOCS[:3]):
        (d / f"{i:02d}.txt").write_text(doc + "\nsecond line", encoding="utf-8")
    s = md.load_corpus("hf", path=d, cache_dir=tmp_path / "c", **HF_KW)  # one doc per file
    assert np.array_equal(_stream(s), _expected_stream([x + "\nsecond line" for x in DOCS[:3]]))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS[:10]}).save_to_disk(str(saved))
    s = md.load_corpus("hf", path=saved, cache_dir=tmp_path / "c", **HF_KW)
    assert np.array_equal(_stream(s), _expected_stream(DOCS[:10]))
    # A named preset reads a local copy when given path=, with its own held-out fractions.
    src = tmp_path / "owt.jsonl"
    _write_jsonl(src, DOCS)
    owt = md.load_corpus("openwebtext", path=src, cache_dir=tmp_path / "c", progress=False)
    assert owt.name == "openwebtext"
    assert np.array_equal(_stream(owt), _expected_stream(DOCS))
    assert 0 < len(owt.test) <= 0.01 * len(_stream(owt))


def test_hf_options_and_errors(tmp_path):
    src = tmp_path / "docs.jsonl"
    _write_jsonl(src, ["", *DOCS[:20], ""])
    cache = tmp_path / "c"
    s = md.load_corpus("hf", path=src, cache_dir=cache, **HF_KW)
    assert np.array_equal(_stream(s), _expected_stream(DOCS[:20]))  # empty docs skipped
    few = md.load_corpus("hf", path=src, cache_dir=cache, max_documents=6, **HF_KW)
    assert np.array_equal(_stream(few), _expected_stream(DOCS[:5]))
    with pytest.raises(KeyError, match="body"):
        md.load_corpus("hf", path=src, cache_dir=cache, text_column="body", **HF_KW)
    # Editing the source invalidates the cache.
    _write_jsonl(src, DOCS[:3])
    s2 = md.load_corpus("hf", path=src, cache_dir=cache, **HF_KW)
    assert not s2.metadata["from_cache"]
    assert np.array_equal(_stream(s2), _expected_stream(DOCS[:3]))
    with pytest.raises(FileNotFoundError, match="no data files"):
        md.load_corpus("hf", path=tmp_path / "missing-*.jsonl", cache_dir=cache)
    with pytest.raises(ValueError, match="needs path"):
        md.load_corpus("hf")
    with pytest.raises(ValueError, match="val_fraction"):
        md.load_corpus("hf", path=src, cache_dir=cache, val_fraction=0.6, test_fraction=0.5)


def test_load_corpus_unknown_name():
    with pytest.raises(ValueError, match="wiki-char"):
        md.load_corpus("wikitext")


def test_import_has_no_side_effects(tmp_path):
    code = "import sys, maskdiff.data; assert 'datasets' not in sys.modules"
    env = {**os.environ, "HOME": str(tmp_path), "MASKDIFF_CACHE": str(tmp_path / "mc")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------

STREAM = np.arange(1050, dtype=np.uint16)


def test_random_crops_shape_range_determinism():
    g = torch.Generator().manual_seed(0)
    x = md.random_crops(STREAM, batch_size=8, seq_len=100, generator=g)
    assert x.shape == (8, 100) and x.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < len(STREAM)
    assert torch.all(x[:, 1:] - x[:, :-1] == 1)  # contiguous windows of the stream
    y = md.random_crops(STREAM, 8, 100, torch.Generator().manual_seed(0))
    z = md.random_crops(STREAM, 8, 100, torch.Generator().manual_seed(1))
    assert torch.equal(x, y) and not torch.equal(x, z)
    starts = md.random_crops(STREAM, 4000, 1050, torch.Generator().manual_seed(2))[:, 0]
    assert torch.all(starts == 0)  # seq_len == N: the only valid start
    starts = md.random_crops(STREAM, 20000, 1, torch.Generator().manual_seed(3))[:, 0]
    assert int(starts.min()) == 0 and int(starts.max()) == len(STREAM) - 1
    with pytest.raises(ValueError, match="fewer than seq_len"):
        md.random_crops(STREAM, 2, 2000, g)


def test_eval_chunks_cover_floor_n_over_l():
    assert md.num_eval_chunks(STREAM, 100) == 10
    batches = list(md.eval_chunks(STREAM, seq_len=100, batch_size=4))
    assert [tuple(b.shape) for b in batches] == [(4, 100), (4, 100), (2, 100)]
    assert np.array_equal(torch.cat(batches).flatten().numpy(), STREAM[:1000])
    assert sum(len(b) for b in md.eval_chunks(STREAM, 100, 4, max_chunks=5)) == 5
    assert list(md.eval_chunks(STREAM[:99], 100, 4)) == []


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shard_partitions(world_size):
    shards = [md.shard(STREAM, r, world_size) for r in range(world_size)]
    assert np.array_equal(np.concatenate(shards), STREAM)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    aligned = [md.shard(STREAM, r, world_size, align=100) for r in range(world_size)]
    assert np.array_equal(np.concatenate(aligned), STREAM)
    per_rank = [b for s in aligned for b in md.eval_chunks(s, 100, 3)]
    whole = list(md.eval_chunks(STREAM, 100, 3))
    assert torch.equal(torch.cat(per_rank), torch.cat(whole))
    with pytest.raises(ValueError, match="rank"):
        md.shard(STREAM, world_size, world_size)


def _small_token_splits(train: np.ndarray = STREAM) -> md.TokenSplits:
    return md.TokenSplits(
        name="tiny", vocab_size=1050, tokenizer=md.CharTokenizer(), train=train,
        validation=STREAM[:100], test=STREAM[:100],
    )


def test_token_splits_data_interface_matches_free_functions():
    # shard_for/draw are the trainer's calls: bitwise the old shard + random_crops on one stream.
    data = _small_token_splits()
    assert data.image_shape is None and data.num_classes == 0 and data.meta() == {}
    n_streams, seq_len, batch = 3, 64, 5
    for k in range(n_streams):
        s = data.shard_for(k, n_streams, seq_len)
        old = md.shard(data.train, k, n_streams)
        assert np.shares_memory(s, data.train) and np.array_equal(s, old)
        g_new, g_old = torch.Generator().manual_seed(100 + k), torch.Generator().manual_seed(100 + k)
        for _ in range(3):  # several draws: the generator streams stay in step
            x, labels = data.draw(s, batch, seq_len, g_new)
            assert labels is None and x.dtype == torch.int64 and x.shape == (batch, seq_len)
            assert torch.equal(x, md.random_crops(old, batch, seq_len, g_old))
        assert torch.equal(g_new.get_state(), g_old.get_state())


def test_token_splits_shard_too_small():
    data = _small_token_splits(STREAM[:100])  # 3 shards of 33/33/34 tokens
    assert len(data.shard_for(2, 3, 34)) == 34
    with pytest.raises(ValueError, match=r"training shard 0 holds 33 tokens, fewer than data\.seq_len=34"):
        data.shard_for(0, 3, 34)


def test_unigram_entropy_bits():
    from scipy.stats import entropy

    uniform = np.tile(np.arange(4, dtype=np.uint8), 50)
    assert md.unigram_entropy_bits(uniform, uniform, 4, smoothing=0) == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    train = rng.choice(5, size=1000, p=[0.5, 0.2, 0.1, 0.1, 0.1]).astype(np.uint16)
    ev = rng.choice(5, size=500, p=[0.2, 0.2, 0.2, 0.2, 0.2]).astype(np.uint16)
    p = np.bincount(ev, minlength=6) / len(ev)
    q = (np.bincount(train, minlength=6) + 0.5) / (len(train) + 0.5 * 6)
    expected = entropy(p, base=2) + entropy(p, q, base=2)  # cross-entropy H(p, q)
    assert md.unigram_entropy_bits(train, ev, 6, smoothing=0.5) == pytest.approx(expected)
    unseen = np.array([5], dtype=np.uint16)
    assert md.unigram_entropy_bits(train, unseen, 6, smoothing=0) == float("inf")
    assert np.isfinite(md.unigram_entropy_bits(train, unseen, 6))  # add-one default
    with pytest.raises(ValueError, match="vocab_size"):
        md.unigram_entropy_bits(train, ev, 3)
