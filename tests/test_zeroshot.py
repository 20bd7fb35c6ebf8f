"""maskdiff.apps.zeroshot: registry, detokenisers, offline loading of each data set's file forms,
block conventions, zero-shot perplexity end to end, the CLI. (The NELBO over scored positions is
tested with the losses, tests/test_losses.py; the loop with score masks in tests/test_evaluate.py.)

Every data file is written here, in the data set's real format (column names, row shapes, file
names and folder layouts of the Hub repositories and of the original downloads); nothing touches
the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set by conftest.py).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports `datasets`
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import maskdiff
from maskdiff.apps import zeroshot as zs
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import Transformer, TransformerConfig

EOT = 50256
V_GPT2 = 50257
LOG_V = math.log(V_GPT2)

# ----------------------------------------------------------------------------------------------
# rows in each data set's format

WIKI_ROWS = [  # Salesforce/wikitext, wikitext-*-raw-v1: one row per line, line break kept, "" for blanks
    "",
    " = Robert Boulter = \n",
    "",
    " Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role on "
    "the television series The Bill in 2000 . \n",
    "",
    " = = Career = = \n",
    "",
    " In 2006 , Boulter starred alongside Whishaw in the play Citizenship written by Mark Ravenhill . \n",
    " = = = Stage = = = \n",
    " The arena holds 1 @,@ 500 people and cost $ 2 @.@ 5 million ( about £ 1 @.@ 6 million ) . \n",
    " He said the \" new \" plan 's aim was \" to win \" ; others disagreed . \n",
]
PTB_ROWS = [  # ptb_text_only, column "sentence": lower-cased, N for numbers, <unk>, split clitics
    "no it was n't black monday",
    "but while the new york stock exchange did n't fall apart friday as the dow jones industrial average "
    "plunged N points most of it in the final hour it barely managed to stay this side of chaos",
    "the company 's shares rose $ N to $ N N in <unk> trading",
    "investors ' fears grew as a N \\/ N stake changed hands",
]
LM1B_ROWS = [  # lm1b plain_text, column "text": tokenised news sentences
    'He added : " It \'s a very good day for us . "',
    "Visit http : / / www.example.com for more information .",
    "Why did n't they go ?",
    "The index fell 2.5 % , or 30 points , to 1,200 .",
]
LAMBADA_ROWS = [  # EleutherAI/lambada_openai, column "text": OpenAI's version, curly quotes
    "\u201cYes, I thought I was going to lose the baby.\u201d \u201cI was scared too,\u201d he stated, sincerity "
    "flooding his eyes. \u201cI was afraid of losing the baby too.\u201d ",
    "She picked up the old map and traced the river with her finger until it reached the sea",
]


def _write_parquet(path, column, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(rows, pa.string())}), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Local copies of each data set in its Hub Parquet layout and in its original plain form."""
    root = tmp_path_factory.mktemp("zeroshot-data")
    f = {}
    # Salesforce/wikitext snapshot: <config>/<split>-00000-of-00001.parquet
    wt = root / "wikitext"
    for config, rows in (("wikitext-2-raw-v1", WIKI_ROWS), ("wikitext-103-raw-v1", WIKI_ROWS[::-1])):
        _write_parquet(wt / config / "test-00000-of-00001.parquet", "text", rows)
        _write_parquet(wt / config / "validation-00000-of-00001.parquet", "text", [" = Other = \n"])
        _write_parquet(wt / config / "train-00000-of-00001.parquet", "text", [" = Train = \n"])
    f["wikitext_dir"] = wt
    # wikitext-2-raw-v1.zip contents: wiki.{train,valid,test}.raw, blank lines are " \n"
    raw = root / "wikitext-2-raw"
    raw.mkdir()
    (raw / "wiki.test.raw").write_text("".join(r if r else " \n" for r in WIKI_ROWS), encoding="utf-8")
    (raw / "wiki.valid.raw").write_text(" = Other = \n", encoding="utf-8")
    (raw / "wiki.train.raw").write_text(" = Train = \n", encoding="utf-8")
    f["wikitext_raw_dir"] = raw
    # ptb_text_only Parquet export: penn_treebank/<split>/0000.parquet, column "sentence"
    ptb = root / "ptb"
    _write_parquet(ptb / "penn_treebank" / "test" / "0000.parquet", "sentence", PTB_ROWS)
    _write_parquet(ptb / "penn_treebank" / "train" / "0000.parquet", "sentence", ["a train sentence"])
    f["ptb_dir"] = ptb
    # Mikolov's simple-examples: ptb.test.txt, a leading space on every line
    f["ptb_txt"] = root / "ptb.test.txt"
    f["ptb_txt"].write_text("".join(f" {r} \n" for r in PTB_ROWS), encoding="utf-8")
    # lm1b Parquet export: plain_text/test/0000.parquet; the original heldout shard (no suffix)
    lm = root / "lm1b"
    _write_parquet(lm / "plain_text" / "test" / "0000.parquet", "text", LM1B_ROWS)
    f["lm1b_dir"] = lm
    held = root / "heldout-monolingual.tokenized.shuffled"
    held.mkdir()
    (held / "news.en.heldout-00000-of-00050").write_text("".join(r + "\n" for r in LM1B_ROWS), encoding="utf-8")
    f["lm1b_heldout_dir"] = held
    # lambada: EleutherAI/lambada_openai default/test/*.parquet; OpenAI's lambada_test.jsonl
    f["lambada_dir"] = root / "lambada_openai"
    _write_parquet(f["lambada_dir"] / "default" / "test" / "0000.parquet", "text", LAMBADA_ROWS)
    f["lambada_jsonl"] = root / "lambada_test.jsonl"
    f["lambada_jsonl"].write_text("".join(json.dumps({"text": r}) + "\n" for r in LAMBADA_ROWS), encoding="utf-8")
    # a longer WikiText-like test split for the end-to-end estimates (≥ 40 blocks of 32 tokens)
    long_rows = WIKI_ROWS * 12  # 132 rows, about 45 blocks of 32 tokens
    f["wikitext_long"] = _write_parquet(root / "long" / "test-00000-of-00001.parquet", "text", long_rows)
    return f


def tiny_gpt2_model(method="md4", seed=0):
    """Untrained GPT-2-vocabulary model: its output head starts at zero, so it predicts uniformly."""
    torch.manual_seed(seed)
    net = Transformer(TransformerConfig(vocab_size=V_GPT2, seq_len=32, n_layers=1, d_model=32, n_heads=2,
                                        time_conditioning=False, causal=(method == "ar"), head_init="zero"))
    return MaskedDiffusion(net, maskdiff.get_schedule("linear"), method)


# ----------------------------------------------------------------------------------------------
# registry


def test_registry_names_configs_columns():
    assert set(zs.DATASETS) == {"lambada", "wikitext2", "wikitext103", "ptb", "lm1b"}
    d = zs.DATASETS
    assert (d["lambada"].hub_id, d["lambada"].config, d["lambada"].text_column) == (
        "EleutherAI/lambada_openai", "default", "text")
    assert (d["wikitext2"].hub_id, d["wikitext2"].config) == ("Salesforce/wikitext", "wikitext-2-raw-v1")
    assert (d["wikitext103"].hub_id, d["wikitext103"].config) == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    assert (d["ptb"].config, d["ptb"].text_column, d["ptb"].parquet_export) == ("penn_treebank", "sentence", True)
    assert d["lm1b"].parquet_export and d["lm1b"].splits == ("train", "test")
    assert d["ptb"].hub_parquet_glob("test") == (
        "hf://datasets/ptb-text-only/ptb_text_only@refs%2Fconvert%2Fparquet/penn_treebank/test/*.parquet")
    assert zs.get_dataset("WT103").key == "wikitext103" and zs.get_dataset("1bw").key == "lm1b"
    with pytest.raises(ValueError, match="unknown zero-shot data set"):
        zs.get_dataset("c4")


# ----------------------------------------------------------------------------------------------
# detokenisers


@pytest.mark.parametrize("raw, expected", [
    (" = = Career = = \n", " == Career ==\n"),
    (" = = = Stage = = = \n", " === Stage ===\n"),
    (" The arena holds 1 @,@ 500 people and cost $ 2 @.@ 5 million ( about £ 1 @.@ 6 million ) . \n",
     " The arena holds 1,500 people and cost $ 2.5 million (about £ 1.6 million).\n"),
    (" a guest @-@ starring role , in 2000 . He left ; then : why ? no ! \n",
     " a guest-starring role, in 2000. He left; then: why? no!\n"),
    (' He said the " new " plan \'s aim was [ not ] { this } \n', ' He said the "new" plan\'s aim was [not] {this}\n'),
    (" the players ' union and the N votes at 5 ° C \n", " the players' union and the 1 votes at 5°C\n"),
    ("", ""),
])
def test_detokenize_wikitext(raw, expected):
    assert zs.detokenize_wikitext(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("no it was n't black monday", "no it wasn't black monday"),
    ("the company 's shares rose $ N to $ N N in <unk> trading", "the company's shares rose $1 to $1 1 in ? trading"),
    ("investors ' fears grew as a N \\/ N stake changed hands", "investors' fears grew as a 1 / 1 stake changed hands"),
    ("a N N N N N gain # N .", "a 1 1 1 1 1 gain #1 ."),
    ("line one \n line two", "line one\nline two"),
])
def test_detokenize_ptb(raw, expected):
    assert zs.detokenize_ptb(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ('He added : " It \'s a very good day for us . "', 'He added: "It\'s a very good day for us."'),
    ("Visit http : / / www.example.com for more information .", "Visit http://www.example.com for more information."),
    ("Why did n't they go ?", "Why did n't they go?"),  # the reference leaves "n't" split
    ("Stop ! The index fell 2.5 % , or 30 points , to $ 1,200 ; see ( below ) and [ notes ] .",
     "Stop! The index fell 2.5 %, or 30 points, to $1,200; see (below) and [notes] ."),
    ("It cost £ 5 / month", "It cost £5/month"),
])
def test_detokenize_lm1b(raw, expected):
    assert zs.detokenize_lm1b(raw) == expected


def test_detokenize_lambada():
    assert zs.detokenize_lambada("  \u201cYes,\u201d he said.  ") == '\n"Yes," he said.'
    assert zs.detokenize_lambada(LAMBADA_ROWS[1]) == "\n" + LAMBADA_ROWS[1]
    assert {k: zs.DATASETS[k].detokenizer for k in zs.DATASETS} == {
        "lambada": "lambada", "wikitext2": "wikitext", "wikitext103": "wikitext", "ptb": "ptb", "lm1b": "lm1b"}


# ----------------------------------------------------------------------------------------------
# loading local files (offline)


@pytest.mark.parametrize("name, key, expected", [
    ("wikitext2", "wikitext_dir", WIKI_ROWS),  # picks <config>/test-*.parquet
    ("wikitext103", "wikitext_dir", WIKI_ROWS[::-1]),
    ("wikitext2", "wikitext_raw_dir", WIKI_ROWS),  # wiki.test.raw: line breaks kept, blank lines -> ""
    ("ptb", "ptb_dir", PTB_ROWS),  # column "sentence"
    ("ptb", "ptb_txt", PTB_ROWS),  # plain lines, stripped
    ("lm1b", "lm1b_dir", LM1B_ROWS),
    ("lm1b", "lm1b_heldout_dir", LM1B_ROWS),  # "heldout" shard names the test split
    ("lambada", "lambada_dir", LAMBADA_ROWS),
    ("lambada", "lambada_jsonl", LAMBADA_ROWS),
])
def test_load_rows_local_forms(files, name, key, expected):
    rows, source = zs.load_rows(name, path=files[key])
    assert rows == expected
    assert source["kind"] == "local" and source["split"] == "test" and source["n_rows"] == len(expected)


def test_load_rows_split_selection_and_errors(files, tmp_path):
    rows, _ = zs.load_rows("wikitext2", path=files["wikitext_dir"], split="validation")
    assert rows == [" = Other = \n"]
    rows, _ = zs.load_rows("wikitext2", path=files["wikitext_raw_dir"], split="validation")  # wiki.valid.raw
    assert rows == [" = Other = \n"]
    assert zs.load_rows("ptb", path=files["ptb_dir"], max_rows=2)[0] == PTB_ROWS[:2]
    with pytest.raises(ValueError, match="splits"):
        zs.load_rows("lm1b", path=files["lm1b_dir"], split="validation")  # LM1B has train and test only
    with pytest.raises(FileNotFoundError, match="no file of split 'validation'"):
        zs.load_rows("ptb", path=files["ptb_dir"], split="validation")
    bad = _write_parquet(tmp_path / "bad.parquet", "body", ["x"])
    with pytest.raises(ValueError, match="text_column"):
        zs.load_rows("ptb", path=bad)
    assert zs.load_rows("ptb", path=bad, text_column="body")[0] == ["x"]


def test_offline_without_path_names_the_option(tmp_path):
    for name in ("wikitext2", "ptb"):  # a Parquet repository and a Parquet export
        with pytest.raises(RuntimeError, match=r"path=.*--path " + name + "=FILE"):
            zs.load_rows(name, cache_dir=tmp_path / "hf-cache")


# ----------------------------------------------------------------------------------------------
# block conventions


def test_concat_blocks_layout():
    docs = [[1, 2, 3], [], [4, 5, 6, 7, 8]]  # stream: 1 2 3 E E 4 5 6 7 8 E  (11 tokens)
    s = zs.concat_blocks(docs, 4)
    assert s.tokens.tolist() == [[1, 2, 3, EOT], [EOT, 4, 5, 6]]
    assert s.score_mask.all() and s.n_unscored_tail == 3 and s.n_documents == 3 and s.n_scored == 8
    s = zs.concat_blocks(docs, 4, drop_last=False)  # the partial block is EOT-padded, padding unscored
    assert s.tokens.tolist()[2] == [7, 8, EOT, EOT]
    assert s.score_mask.tolist()[2] == [True, True, True, False] and s.n_unscored_tail == 0
    s = zs.concat_blocks(iter(docs), 4, max_blocks=1)
    assert s.tokens.tolist() == [[1, 2, 3, EOT]] and s.n_documents == 1
    with pytest.raises(ValueError, match="fewer than one block"):
        zs.concat_blocks([[1]], 4)


def test_pad_sequences_layout():
    docs = [[1, 2], [], [3, 4, 5, 6, 7, 8]]
    s = zs.pad_sequences(docs, 5)
    assert s.tokens.tolist() == [[EOT, 1, 2, EOT, EOT], [EOT, EOT, EOT, EOT, EOT], [EOT, 3, 4, 5, 6]]
    assert s.score_mask.tolist() == [
        [False, True, True, True, False],  # the row and its closing end-of-text; not BOS, not padding
        [False, True, False, False, False],  # an empty row: its end-of-text only
        [False, True, True, True, True],  # truncated: no closing end-of-text
    ]
    assert s.n_truncated == 1 and s.n_scored == 3 + 1 + 4
    s = zs.pad_sequences(docs, 5, score_bos=True, max_sequences=2)
    assert len(s) == 2 and s.score_mask[:, 0].all()


def test_build_sequences_from_wikitext_rows(files):
    rows, _ = zs.load_rows("wikitext2", path=files["wikitext_dir"])
    tok = maskdiff.data.GPT2Tokenizer()
    docs = [tok.encode(zs.detokenize_wikitext(r)) for r in rows]
    concat = zs.build_sequences(rows, seq_len=16, convention="concat", detokenize=zs.detokenize_wikitext)
    stream = [t for d in docs for t in d + [EOT]]
    assert concat.tokens.reshape(-1).tolist() == stream[: len(concat) * 16]
    assert concat.n_unscored_tail == len(stream) % 16 and concat.score_mask.all()
    pad = zs.build_sequences(rows, seq_len=16, convention="pad", detokenize=zs.detokenize_wikitext)
    assert len(pad) == len(rows) and (pad.tokens[:, 0] == EOT).all()
    for i, d in enumerate(docs):
        n = min(len(d), 15)
        assert pad.tokens[i, 1 : 1 + n].tolist() == d[:n]
        assert pad.score_mask[i].sum() == (len(d) + 1 if len(d) <= 14 else 15)
        assert (pad.tokens[i][~pad.score_mask[i]] == EOT).all()  # unscored positions are BOS/padding EOTs
    skipped = zs.build_sequences(rows, seq_len=16, convention="pad", skip_empty=True)
    assert len(skipped) == sum(bool(r.strip()) for r in rows)


# ----------------------------------------------------------------------------------------------
# zero-shot perplexity end to end


@pytest.mark.parametrize("convention", ["concat", "pad"])
def test_uniform_model_perplexity_is_vocab_size(files, convention):
    """A zero-head model predicts uniformly: E[NELBO] = log V per scored token, whatever the schedule
    and the masking. The estimate must agree within its standard error."""
    model = tiny_gpt2_model()
    r = zs.zeroshot_perplexity(model, "wikitext2", path=files["wikitext_long"], convention=convention,
                               batch_size=8, num_time_draws=2, seed=0, max_sequences=48)
    assert r["n_sequences"] >= 40 and r["seq_len"] == 32 and r["split"] == "test"
    assert abs(r["nats_per_token"] - LOG_V) < 4 * r["stderr_nats"]
    assert r["stderr_nats"] < 0.1 * LOG_V
    lo, hi = r["perplexity_ci95"]
    assert lo < r["perplexity"] < hi
    assert r["perplexity"] == pytest.approx(math.exp(r["nats_per_token"]))
    assert r["bits_per_token"] == pytest.approx(r["nats_per_token"] / math.log(2))
    assert 0 < r["mc_stderr_nats"] <= r["stderr_nats"] * 3
    terms = r["terms_nats_per_token"]
    assert terms["reconstruction"] + terms["prior"] == pytest.approx(2e-4 * LOG_V, rel=1e-3)  # ε = 1e-4 each
    if convention == "pad":
        assert r["n_sequences"] == r["n_documents"] == 48 and r["n_rows"] == 132 and r["n_truncated"] > 0
        assert "not the EOT padding" in r["scored"]


@pytest.mark.parametrize("convention", ["concat", "pad"])
def test_uniform_ar_model_is_exact(files, convention):
    """The AR baseline's NLL has no Monte Carlo noise: exactly log V per scored token."""
    model = tiny_gpt2_model("ar")
    r = zs.zeroshot_perplexity(model, "ptb", path=files["ptb_dir"], convention=convention, seq_len=16,
                               batch_size=4, drop_last=False)
    expected = zs.build_sequences(PTB_ROWS, seq_len=16, convention=convention, detokenize=zs.detokenize_ptb,
                                  drop_last=False)
    assert r["n_scored_tokens"] == expected.n_scored
    assert r["perplexity"] == pytest.approx(V_GPT2, rel=1e-5)
    assert r["stderr_nats"] == pytest.approx(0.0, abs=1e-5)


def test_concat_matches_evaluate_nelbo(files):
    from maskdiff.evaluate import evaluate_nelbo

    model = tiny_gpt2_model()
    with torch.no_grad():
        model.network.head.weight.normal_(0, 0.02)  # not uniform: a real check of the pairing
    rows, _ = zs.load_rows("lm1b", path=files["lm1b_dir"])
    seqs = zs.build_sequences(rows * 2, seq_len=8, convention="concat", detokenize=zs.detokenize_lm1b)
    ours = zs.evaluate_sequences(model, seqs, batch_size=4, num_time_draws=2, seed=3)
    ref = evaluate_nelbo(model, seqs.tokens.reshape(-1), seq_len=8, batch_size=4, num_time_draws=2, seed=3)
    assert ours["nats_per_token"] == pytest.approx(ref["nats_per_token"], rel=1e-9)
    assert ours["stderr"] == pytest.approx(ref["stderr"], rel=1e-6)
    assert ours["n_sequences"] == ref["n_sequences"] == len(seqs)


@pytest.mark.parametrize("name, key", [("lambada", "lambada_jsonl"), ("lm1b", "lm1b_heldout_dir"),
                                       ("wikitext103", "wikitext_dir")])
def test_each_dataset_end_to_end(files, name, key):
    r = zs.zeroshot_perplexity(tiny_gpt2_model(), name, path=files[key], convention="pad", max_sequences=2,
                               batch_size=2)
    assert r["dataset"] == name and r["n_sequences"] == 2 and r["perplexity"] > 0
    assert r["source"]["kind"] == "local"


def test_rejects_character_level_and_bad_arguments(files):
    char = MaskedDiffusion(Transformer(TransformerConfig(vocab_size=27, seq_len=32, n_layers=1, d_model=32,
                                                         n_heads=2)), maskdiff.get_schedule("linear"), "md4")
    with pytest.raises(ValueError, match="GPT-2 vocabulary.*character-level"):
        zs.zeroshot_perplexity(char, "ptb", path=files["ptb_dir"])
    model = tiny_gpt2_model()
    with pytest.raises(ValueError, match="exceeds the model's sequence length"):
        zs.zeroshot_perplexity(model, "ptb", path=files["ptb_dir"], seq_len=64)
    with pytest.raises(ValueError, match="convention"):
        zs.zeroshot_perplexity(model, "ptb", path=files["ptb_dir"], convention="wrap")


# ----------------------------------------------------------------------------------------------
# command line


def test_cli_writes_json_and_prints_table(files, tmp_path, monkeypatch, capsys):
    import maskdiff.runs as ckpt

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fake = ckpt.LoadedRun(run_dir, SimpleNamespace(diffusion=SimpleNamespace(method="md4")), tiny_gpt2_model(),
                          123, "ema")
    monkeypatch.setattr(ckpt, "load", lambda path, weights="ema", device="cpu": fake)
    from maskdiff import cli

    parser = cli.build_parser()
    args = parser.parse_args(["zeroshot", str(run_dir), "--datasets", "wikitext2,ptb", "--path",
                              f"wikitext2={files['wikitext_raw_dir']}", "--path", f"ptb={files['ptb_txt']}",
                              "--convention", "pad", "--draws", "2", "--max-sequences", "3", "--seed", "1",
                              "--device", "cpu", "--no-progress"])
    assert cli.HANDLERS[args.command] is cli.cmd_zeroshot
    assert cli.cmd_zeroshot(args) == 0
    out = capsys.readouterr().out
    assert "| WikiText-2 | test | pad | 3 |" in out and "| PTB | test | pad | 3 |" in out
    stored = json.loads((run_dir / "zeroshot.json").read_text())["results"]
    key = "ptb/pad/test-K2-n3-seed1"  # results of non-default settings are keyed by them
    assert set(stored) == {"wikitext2/pad/test-K2-n3-seed1", key}
    assert stored[key]["step"] == 123 and stored[key]["num_time_draws"] == 2
    # a second run adds to the file
    args = parser.parse_args(["zeroshot", str(run_dir), "--datasets", "lambada", "--path",
                              f"lambada={files['lambada_dir']}", "--convention", "pad", "--device", "cpu",
                              "--no-progress"])
    cli.cmd_zeroshot(args)
    assert set(json.loads((run_dir / "zeroshot.json").read_text())["results"]) == {
        "wikitext2/pad/test-K2-n3-seed1", "ptb/pad/test-K2-n3-seed1", "lambada/pad/test"}
    with pytest.raises(ValueError, match="NAME=FILE"):
        cli._parse_paths(["wikitext2"])


def test_results_of_other_settings_get_their_own_key(files, tmp_path, monkeypatch):
    """zeroshot.json: a run with other settings adds a key named by them; the default key is kept."""
    import maskdiff.runs as ckpt
    from maskdiff.apps.zeroshot import run_zeroshot

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fake = ckpt.LoadedRun(run_dir, SimpleNamespace(diffusion=SimpleNamespace(method="md4")), tiny_gpt2_model(),
                          7, "ema")
    monkeypatch.setattr(ckpt, "load", lambda path, weights="ema", device="cpu": fake)
    common = dict(paths={"ptb": files["ptb_txt"]}, convention="pad", device="cpu", progress=False)
    run_zeroshot(run_dir, ["ptb"], max_sequences=3, **common)
    first = json.loads((run_dir / "zeroshot.json").read_text())["results"]
    run_zeroshot(run_dir, ["ptb"], max_sequences=3, draws=2, seed=1, **common)
    stored = json.loads((run_dir / "zeroshot.json").read_text())["results"]
    assert set(stored) == {"ptb/pad/test-n3", "ptb/pad/test-K2-n3-seed1"}
    assert stored["ptb/pad/test-n3"] == first["ptb/pad/test-n3"]  # not replaced
    assert stored["ptb/pad/test-K2-n3-seed1"]["num_time_draws"] == 2
