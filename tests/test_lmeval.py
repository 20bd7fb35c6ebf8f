"""maskdiff in lm-evaluation-harness (maskdiff.apps.lmeval): the estimators against exact values, and the
real harness, offline, on local tasks written here (a multiple-choice task and a rolling-perplexity
task), through ``lm_eval.simple_evaluate`` and through ``maskdiff lm-eval``.

* a zero-head model (uniform over V) gives exactly -n log V for every request, Monte Carlo error 0;
* the AR baseline's exact-order log-likelihood equals its exact log-likelihood (chain rule, computed
  independently with the loss), also for a request truncated on the left;
* the Monte Carlo estimates (mask counts, and the library loss with the context fixed) of a trained
  toy model agree with the exact enumeration of its bound within 4 standard errors, and variants with
  a deliberate error (the context masked too, a mask-count law off by one position) do not;
* the exact-order likelihood is normalised; windows, normalisation, generation, the error report.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports `datasets` or `lm_eval`
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import itertools
import json
import math
import shutil
from pathlib import Path

import lm_eval
import numpy as np
import pytest
import torch
from lm_eval.tasks import TaskManager
from safetensors.torch import load_file, save_file
from scipy.stats import binom

import maskdiff
from maskdiff.apps.lmeval import LikelihoodEstimator, MaskdiffLM, TextCodec, Window, pair_windows, rolling_windows
from maskdiff.apps.lmeval import estimators as est
from maskdiff.apps.lmeval.report import flip_possible, mc_summary
from maskdiff.cli import main
from maskdiff.data import CharTokenizer
from maskdiff.losses import ar_nll_terms
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import Transformer, TransformerConfig

GOLDEN = Path(__file__).resolve().parent / "data" / "golden-run"
LOG27 = math.log(27)

MC_DOCS = [  # the context ends before the space that starts each choice
    {"context": "the history of the", "choices": [" world", " war", " city of paris"], "label": 1},
    {"context": "Paris is the capital of", "choices": [" France.", " Spain", " the moon"], "label": 1},
    {"context": "a" * 40, "choices": [" b", " cc"], "label": 1},  # context + choice over 32 tokens: truncated
    {"context": "one two", "choices": [" three", " seven"], "label": 0},  # equal lengths
]
ROLL_DOCS = [{"text": "the quick brown fox jumps over the lazy dog " * 2}, {"text": "short text"}]


def write_tasks(folder: Path) -> Path:
    """A multiple-choice and a rolling-perplexity task, YAML + JSONL, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "roll.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ROLL_DOCS))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "toy_mc.yaml").write_text(
        "task: toy_mc\n" + common.format(folder / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n')
    (folder / "toy_roll.yaml").write_text(
        "task: toy_roll\n" + common.format(folder / "roll.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        + "".join(f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: false\n" for m, a in
                  [("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                   ("bits_per_byte", "bits_per_byte")]))
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = write_tasks(tmp_path_factory.mktemp("tasks"))
    return folder, TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("golden") / "run"
    shutil.copytree(GOLDEN, run)
    return run


@pytest.fixture(scope="module")
def zero_head_run(tmp_path_factory):
    """The golden 0.1 run with its output head set to zero: it predicts 1/27 for every character."""
    run = tmp_path_factory.mktemp("zero") / "run"
    shutil.copytree(GOLDEN, run)
    for f in (run / "checkpoints").glob("step-*/*.safetensors"):
        state = load_file(f)
        if "network.head.weight" in state:
            state["network.head.weight"] = torch.zeros_like(state["network.head.weight"])
            save_file(state, f)
    return run


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    """A tiny autoregressive baseline run (2 training steps, 32 characters)."""
    out = tmp_path_factory.mktemp("ar") / "run"
    sets = ["train.steps=2", "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "data.seq_len=32",
            "train.batch_size=8", "train.eval_every=0", "diffusion.method=ar", "model.causal=true",
            "model.time_conditioning=false", "optim.lr=3e-2"]
    assert main(["train", "--preset", "demo", "--out", str(out), "--no-progress",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# a trained toy model and the exact value of its bound


def toy_model(steps: int = 150, seed: int = 0) -> MaskedDiffusion:
    """A time-conditioned MD4 (V=4, L=6) trained on a Markov chain (next token = previous + 1 mod 4
    with probability 0.85), so that its predictions depend strongly on which tokens are masked."""
    torch.manual_seed(seed)
    net = Transformer(TransformerConfig(vocab_size=4, seq_len=6, n_layers=1, d_model=32, n_heads=2, cond_dim=32,
                                        time_embed_dim=32, time_conditioning=True, head_init="zero"))
    model = MaskedDiffusion(net, maskdiff.get_schedule("linear"), "md4")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.empty(64, 6, dtype=torch.long)
        x[:, 0] = torch.randint(0, 4, (64,), generator=g)
        for i in range(1, 6):
            jump = torch.rand(64, generator=g) < 0.85
            x[:, i] = torch.where(jump, (x[:, i - 1] + 1) % 4, torch.randint(0, 4, (64,), generator=g))
        model(x, generator=g)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@torch.no_grad()
def exact_bound(model: MaskedDiffusion, w: Window, nodes: int = 64) -> float:
    """The conditional negative ELBO, enumerated: every mask pattern of the scored positions at each
    Gauss-Legendre node in t, straight from the definition (docs/math.md)::

        ∫_0^1 Σ_M -α'(t) (1-α)^(m-1) α^(n-m) Σ_{i∈M} -log μ(z_M, t)_{i,x_i} dt + n (1-α(0)) log V + n α(1) log V
    """
    sched, v = model.schedule, model.vocab_size
    x = torch.tensor(w.tokens)
    n, c = w.n_scored, w.n_context
    pats = torch.tensor(list(itertools.product([False, True], repeat=n)))[1:]  # (P, n), non-empty
    masked = torch.zeros(len(pats), len(x), dtype=torch.bool)
    masked[:, c:] = pats
    z = torch.where(masked, torch.full_like(x, v), x)
    u, weights = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for ti, wi in zip((u + 1) / 2, weights / 2):
        t = torch.tensor(float(ti), dtype=torch.float64)
        a, da = float(sched.alpha(t)), float(sched.alpha_prime(t))
        logp = torch.log_softmax(model.network(z, torch.full((len(z),), float(ti))).double(), -1)
        ce = (-logp.gather(-1, x.expand(len(z), -1)[..., None]).squeeze(-1) * masked).sum(-1)  # (P,)
        m = pats.sum(1).double()
        total += wi * float((-da * (1 - a) ** (m - 1) * a ** (n - m) * ce).sum())
    a0, a1 = float(sched.alpha(torch.tensor(0.0))), float(sched.alpha(torch.tensor(1.0)))
    return total + n * (1 - a0) * math.log(v) + n * a1 * math.log(v)


@pytest.fixture(scope="module")
def toy():
    model = toy_model()
    w = Window((0, 1, 2, 3, 0, 1), 2)  # context "0 1", scored "2 3 0 1"
    return model, w, exact_bound(model, w)


def test_mask_count_law_and_draws():
    for n, a0, a1 in [(1, 1.0, 0.0), (5, 1.0, 0.0), (7, 0.9999, 1e-4), (40, 0.95, 0.1)]:
        q = est.mask_count_probabilities(n, a0, a1)
        grid = np.linspace(a1, a0, 20001)  # q(m) = ∫ P(Bin(n-1, 1-a) = m-1) da / (α(0) - α(1))
        numeric = [np.trapezoid(binom.pmf(k, n - 1, 1 - grid), grid) / (a0 - a1) for k in range(n)]
        assert np.allclose(q.numpy(), numeric, atol=1e-6) and abs(float(q.sum()) - 1) < 1e-12
    assert torch.allclose(est.mask_count_probabilities(5, 1.0, 0.0), torch.full((5,), 0.2, dtype=torch.float64))
    # the joint law: a is uniform on [α(1), α(0)] and m - 1 | a ~ Bin(n - 1, 1 - a); K draws stratify m
    g = torch.Generator().manual_seed(0)
    n, a0, a1 = 6, 0.9, 0.05
    m, a = zip(*[est.draw_mask_counts(n, 8, a0, a1, g) for _ in range(500)])
    m, a = torch.stack(m).double(), torch.stack(a)
    se = float(a.std() / math.sqrt(a.numel()))
    assert abs(float(a.mean()) - (a0 + a1) / 2) < 4 * se and a.min() >= a1 and a.max() <= a0
    resid = (m - 1) - (n - 1) * (1 - a)  # E[m - 1 | a] = (n - 1)(1 - a)
    assert abs(float(resid.mean())) < 4 * float(resid.std() / math.sqrt(resid.numel()))
    cdf = torch.cumsum(est.mask_count_probabilities(n, a0, a1), 0)
    low = (torch.arange(8) // 2) / 4  # strata of two draws: draws 2h, 2h+1 own the quantile band [h/4, (h+1)/4)

    def in_bands(row):  # m = Q⁻¹(u) for a u in the band: Q(m - 1) ≤ u < Q(m)
        below = torch.cat([torch.zeros(1, dtype=torch.float64), cdf])[row.long() - 1]
        return bool(((below <= low + 0.25 + 1e-12) & (cdf[row.long() - 1] >= low - 1e-12)).all())

    assert all(in_bands(row) for row in m)  # every count in its stratum's band (independent draws are not)
    independent = torch.multinomial(est.mask_count_probabilities(n, a0, a1), 8 * 500, replacement=True,
                                    generator=g).view(500, 8) + 1
    assert sum(not in_bands(r.double()) for r in independent) > 400
    # the error of stratified draws: unbiased, and below sd/√K when the strata differ
    values, strata = torch.tensor([1.0, 1.2, 5.0, 5.4]), est.strata_of(4)
    assert est.stratified_stderr(values, strata) == pytest.approx(math.sqrt(2 * 0.02 + 2 * 0.08) / 4)
    assert est.stratified_stderr(values, strata) < float(values.std() / 2)
    assert est.strata_of(5).tolist() == [0, 0, 1, 1, 1] and math.isnan(est.stratified_stderr(values[:1], strata[:1]))
    sched = maskdiff.get_schedule("cosine")
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
    assert torch.allclose(est.time_of_alpha(sched, sched.alpha(t)), t, atol=1e-9)


def test_estimates_of_a_trained_toy_model_agree_with_the_exact_bound(toy):
    model, w, exact = toy
    counts = LikelihoodEstimator(model, draws=2048, batch_size=512, greedy=False).estimate([w])[0]
    times = LikelihoodEstimator(model, estimator="times", draws=2048, greedy=False).estimate([w])[0]
    for e in (counts, times):
        assert abs(e.nats - exact) < 4 * e.stderr, (e, exact)
    assert counts.stderr < times.stderr  # the mask-count form has the smaller error (here about 1/2)
    assert exact < w.n_scored * math.log(4)  # trained: better than uniform
    # power: the context masked too (the plain loss with a score mask) is another quantity
    x = torch.tensor(w.tokens).repeat(2048, 1)
    score = torch.zeros_like(x, dtype=torch.bool)
    score[:, w.n_context:] = True
    with torch.no_grad():
        wrong = model(x, generator=torch.Generator().manual_seed(1), score_mask=score)["nelbo"].double()
    assert abs(float(wrong.mean()) - exact) > 4 * float(wrong.std() / math.sqrt(len(wrong)))


def test_a_wrong_mask_count_law_is_detected(toy, monkeypatch):
    """Power: forgetting the position masked for sure (m = Bin(n, 1 - a), at least 1) biases the estimate."""
    model, w, exact = toy

    def wrong_counts(n, draws, alpha0, alpha1, generator):
        a = alpha1 + (alpha0 - alpha1) * torch.rand(draws, generator=generator, dtype=torch.float64)
        m = torch.binomial(torch.full((draws,), float(n)), (1 - a).float(), generator=generator).long().clamp(min=1)
        return m, a

    monkeypatch.setattr(est, "draw_mask_counts", wrong_counts)
    wrong = LikelihoodEstimator(model, draws=2048, batch_size=512, greedy=False).estimate([w])[0]
    assert abs(wrong.nats - exact) > 4 * wrong.stderr, (wrong, exact)


def test_exact_order_is_normalised_and_greedy_is_its_argmax(toy):
    model, w, _ = toy
    e = LikelihoodEstimator(model, likelihood="exact-order")
    ctx = w.tokens[:2]
    all_cont = [Window(ctx + c, 2) for c in itertools.product(range(4), repeat=3)]
    out = e.estimate(all_cont)
    assert math.fsum(math.exp(-o.nats) for o in out) == pytest.approx(1.0, abs=1e-9)
    assert all(o.stderr == 0 and o.draws == 0 for o in out)
    best = min(range(len(out)), key=lambda i: out[i].nats)
    greedy = [i for i, o in enumerate(out) if o.greedy]
    assert len(greedy) == 1  # exactly one continuation is the left-to-right argmax decode
    assert out[best].nats < 3 * math.log(4)


def test_genmd4_uses_its_own_bound_with_the_context_fixed():
    torch.manual_seed(0)
    net = Transformer(TransformerConfig(vocab_size=5, seq_len=8, n_layers=1, d_model=16, n_heads=2, cond_dim=16,
                                        time_embed_dim=16, head_init="zero"))  # untrained, zero head: μ uniform
    model = MaskedDiffusion(net, maskdiff.get_schedule("genmd4", vocab_size=5), "genmd4").eval()
    seen = []
    real_forward = net.forward
    net.forward = lambda z, t=None, labels=None, return_hidden=False: (seen.append(z.clone()), real_forward(
        z, t, labels=labels, return_hidden=return_hidden))[1]
    e = LikelihoodEstimator(model, draws=256, greedy=False).estimate([Window((1, 2, 3, 4, 0, 1), 3)])[0]
    assert all((z[:, :3] == torch.tensor([1, 2, 3])).all() for z in seen)  # the context is never masked
    assert any((z[:, 3:] == 5).any() for z in seen)
    # equal exponents and a uniform μ: the GenMD4 bound is n log V (docs/math.md, "GenMD4")
    assert abs(e.nats - 3 * math.log(5)) < 4 * e.stderr and e.stderr > 0


# ----------------------------------------------------------------------------------------------
# windows and text


def test_windows():
    L = 8
    tokens = list(range(30))
    for prefix in ((), (99,)):
        wins = rolling_windows(tokens, L, prefix)
        scored = [t for w in wins for t in w.tokens[w.n_context:]]
        assert scored == tokens and all(len(w.tokens) <= L for w in wins)
        assert len(wins[-1].tokens) == L and wins[-1].n_context > 0  # the last window is full-length
    assert [w.tokens for w in rolling_windows(tokens, L)][:3] == [tuple(range(0, 8)), tuple(range(8, 16)),
                                                                  tuple(range(16, 24))]  # maskdiff eval's chunks
    assert rolling_windows(tokens, L, (99,))[0] == Window((99,) + tuple(range(7)), 1)
    (w,) = pair_windows(list(range(20)), [50, 51, 52], L)  # left truncation
    assert w == Window(tuple(range(15, 20)) + (50, 51, 52), 5)
    long = pair_windows([1, 2], list(range(20)), L)  # a continuation longer than the model: chained windows
    assert [t for w in long for t in w.tokens[w.n_context:]] == list(range(20))
    assert all(len(w.tokens) <= L for w in long)


def test_character_normalisation():
    codec = TextCodec(CharTokenizer(), characters=True)
    ctx, cont = codec.encode_pair("Paris, the capital of", " France!")
    tok = CharTokenizer()
    assert tok.decode(ctx) == "paris the capital of" and tok.decode(cont) == " france "
    ctx, cont = codec.encode_pair("It has 2 ", "dogs.")  # digits spelled out; a space run across the boundary
    assert tok.decode(ctx) + tok.decode(cont) == "it has two dogs " and tok.decode(cont) == "dogs "
    assert codec.normalised == 2
    strict = TextCodec(CharTokenizer(), characters=True, normalize="none")
    assert strict.encode_pair("the cat", " sat") == (tok.encode("the cat"), tok.encode(" sat"))
    with pytest.raises(ValueError, match="normalize=text8"):
        strict.encode_pair("The cat", " sat")


def test_flip_report_has_power():
    assert flip_possible([-1.0, -1.5], [0.1, 0.1]) is False  # 0.5 apart, 2 · 0.14 = 0.28
    assert flip_possible([-1.0, -1.5], [0.2, 0.2]) is True   # 0.57 > 0.5
    assert flip_possible([-1.0, -1.0], [0.0, 0.0]) is True   # a tie can go either way
    assert flip_possible([-1.0, -2.0], [float("nan"), 0.1]) is None


# ----------------------------------------------------------------------------------------------
# the real harness


def records_by_kind(lm, kind):
    return {k[1:]: v for k, v in lm.records.items() if k[0] == kind}


def test_zero_head_model_through_simple_evaluate(zero_head_run, tasks):
    folder, manager = tasks
    lm = MaskdiffLM(run=str(zero_head_run), draws=3, progress=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=["toy_mc", "toy_roll"], task_manager=manager)
    tok = CharTokenizer()
    mc = records_by_kind(lm, "loglikelihood")
    assert len(mc) == sum(len(d["choices"]) for d in MC_DOCS)
    for (ctx, cont), r in mc.items():
        n = len(TextCodec(tok, characters=True).encode_pair(ctx, cont)[1])
        assert r["loglikelihood"] == pytest.approx(-n * LOG27, rel=1e-12) and abs(r["mc_stderr"]) < 1e-12
    roll = records_by_kind(lm, "loglikelihood_rolling")
    for (text,), r in roll.items():
        assert r["loglikelihood"] == pytest.approx(-len(text) * LOG27, rel=1e-12) and abs(r["mc_stderr"]) < 1e-12
    assert res["results"]["toy_roll"]["bits_per_byte,none"] == pytest.approx(math.log2(27), rel=1e-9)
    assert res["results"]["toy_mc"]["acc,none"] == pytest.approx(3 / 4)  # the shortest (or first) choice wins
    summary = mc_summary(res, lm.records)
    assert summary["toy_mc"]["mean_mc_stderr"] < 1e-12 and summary["toy_roll"]["mc_stderr_bits_per_byte"] < 1e-12
    assert lm.codec.normalised > 0  # "Paris", "France." went through the text8 rule


def test_registered_model_and_the_command(tmp_path, zero_head_run, tasks, capsys):
    folder, manager = tasks
    log = tmp_path / "mc.jsonl"
    res = lm_eval.simple_evaluate(model="maskdiff", model_args=f"run={zero_head_run},draws=2,progress=false,mc_log={log}",
                                  tasks=["toy_mc"], task_manager=manager, limit=2)
    assert res["results"]["toy_mc"]["acc,none"] == 1.0  # 2 items, shortest choice is the answer in both
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 6 and {tuple(x["args"]) for x in lines} == {
        (d["context"], c) for d in MC_DOCS[:2] for c in d["choices"]}
    assert all(x["kind"] == "loglikelihood" and x["mc_stderr"] == 0 and x["draws"] == 2 for x in lines)
    out = tmp_path / "out"
    args = ["lm-eval", str(zero_head_run), "--tasks", "toy_mc,toy_roll", "--include-path", str(folder),
            "--draws", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 0  # a second run never replaces the first result
    files = sorted(p.name for p in out.iterdir())
    assert files == ["lmeval-toy_mc+toy_roll-K2-2.json", "lmeval-toy_mc+toy_roll-K2.json"]
    kept = json.loads((out / files[1]).read_text())
    assert kept["results"]["toy_roll"]["bits_per_byte,none"] == pytest.approx(math.log2(27), rel=1e-9)
    mc = kept["maskdiff"]["mc"]
    assert mc["toy_mc"]["items"] == 4 and mc["toy_mc"]["mean_mc_stderr"] < 1e-12
    assert mc["toy_mc"]["flip_fraction"] == pytest.approx(1 / 4)  # only the tie " three" / " seven"
    assert kept["maskdiff"]["settings"]["draws"] == 2 and "toy_mc | acc |" in capsys.readouterr().out
    code = main(["lm-eval", str(zero_head_run), "--tasks", "toy_mc", "--include-path", str(folder / "mc.jsonl")])
    assert code == 2 and "not a folder" in capsys.readouterr().err
    assert main(["lm-eval", str(zero_head_run), "--tasks", "toy_mc", "--draws", "0"]) == 2
    assert "--draws 0: must be a positive integer" in capsys.readouterr().err


def test_ar_baseline_exact_order_is_its_exact_likelihood(ar_run, tasks):
    folder, manager = tasks
    run = maskdiff.load(ar_run)
    for likelihood in ("exact-order", "elbo"):  # the AR model has one likelihood either way
        lm = MaskdiffLM(run=run, likelihood=likelihood, progress=False)
        lm_eval.simple_evaluate(model=lm, tasks=["toy_mc"], task_manager=manager)
        codec = TextCodec(run.tokenizer, characters=True)
        for (ctx, cont), r in records_by_kind(lm, "loglikelihood").items():
            c, x = codec.encode_pair(ctx, cont)
            seq = torch.tensor((c + x)[-32:])[None]  # the last 32 characters: truncated on the left
            with torch.no_grad():  # chain rule: log p(x | c) = log p(c x) - log p(c), same start
                full = ar_nll_terms(run.model.network, seq, vocab_size=27)["nelbo"]
                head = ar_nll_terms(run.model.network, seq[:, : seq.shape[1] - len(x)], vocab_size=27)["nelbo"]
            assert r["loglikelihood"] == pytest.approx(float(head - full), abs=1e-4) and r["mc_stderr"] == 0
        assert any(len(a) + len(b) > 32 for a, b in records_by_kind(lm, "loglikelihood"))


def test_generate_until(golden_run, ar_run):
    from types import SimpleNamespace

    for run, cap in ((golden_run, 32), (ar_run, None)):
        lm = MaskdiffLM(run=str(run), progress=False)
        reqs = [SimpleNamespace(args=("the history of", {"until": ["q"], "max_gen_toks": 12})),
                SimpleNamespace(args=("", {"until": [], "max_gen_toks": 40, "do_sample": True, "temperature": 1.0}))]
        first, second = lm.generate_until(reqs)
        assert len(first) <= 12 and "q" not in first and len(second) == min(40, cap or 40)
        assert set(first + second) <= set(" abcdefghijklmnopqrstuvwxyz")
        assert lm.generate_until(reqs) == [first, second]  # seeded by the request
    # another sampler by name, with an option, as model arguments
    lm = MaskdiffLM(run=str(golden_run), sampler="remdm", sampler_eta="0.1", progress=False)
    assert lm.sampler_options == {"eta": "0.1"}
    (text,) = lm.generate_until([SimpleNamespace(args=("the history of", {"max_gen_toks": 8}))])
    assert len(text) == 8 and set(text) <= set(" abcdefghijklmnopqrstuvwxyz")
    with pytest.raises(TypeError, match="no option 'no_such_option'"):
        MaskdiffLM(run=str(golden_run), sampler="remdm", sampler_no_such_option=1, progress=False)


def test_gpt2_token_model_through_the_harness(tasks):
    """The GPT-2 path: the harness's pair convention, end-of-text for an empty context and before a
    document, and a uniform model (untrained: zero head) giving -n log 50257 with error 0."""
    from maskdiff.config import get_preset
    from maskdiff.data.tokenizers import GPT2_EOT_ID, GPT2Tokenizer
    from maskdiff.runs import LoadedRun

    tok = GPT2Tokenizer()
    codec = TextCodec(tok, characters=False)
    ctx, cont = codec.encode_pair("The capital of France is ", "Paris.")  # the trailing space joins " Paris"
    assert tok.decode(ctx) == "The capital of France is" and tok.decode(cont) == " Paris."
    assert codec.encode_pair("", "Hello") == ([GPT2_EOT_ID], tok.encode("Hello"))
    assert codec.prefix == (GPT2_EOT_ID,) and codec.normalised == 0
    torch.manual_seed(0)
    net = Transformer(TransformerConfig(vocab_size=50257, seq_len=32, n_layers=1, d_model=16, n_heads=2,
                                        cond_dim=16, time_embed_dim=16, head_init="zero"))  # uniform
    model = MaskedDiffusion(net, maskdiff.get_schedule("linear"), "md4").eval()
    lm = MaskdiffLM(run=LoadedRun(Path("tiny-gpt2"), get_preset("wiki-gpt2-md4"), model, 0, "ema"), draws=2,
                    greedy=False, progress=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=["toy_mc", "toy_roll"], task_manager=tasks[1])
    log_v = math.log(50257)
    for (c, x), r in records_by_kind(lm, "loglikelihood").items():
        n = len(codec.encode_pair(c, x)[1])
        assert r["loglikelihood"] == pytest.approx(-n * log_v, rel=1e-12) and abs(r["mc_stderr"]) < 1e-12
    for (text,), r in records_by_kind(lm, "loglikelihood_rolling").items():
        assert r["loglikelihood"] == pytest.approx(-len(tok.encode(text)) * log_v, rel=1e-12)
    assert res["results"]["toy_roll"]["bits_per_byte,none"] > 0


def test_the_harness_cli_entry_registers_the_model(monkeypatch, capsys):
    """``python -m maskdiff.apps.lmeval`` is the harness's CLI with "maskdiff" registered (a full run
    builds the harness's whole task index, ~20 s: docs/lm-eval.md shows one)."""
    from lm_eval.api.registry import get_model

    from maskdiff.apps.lmeval.__main__ import main as harness_main

    monkeypatch.setattr("sys.argv", ["lm-eval", "run", "--help"])
    with pytest.raises(SystemExit) as exit_:
        harness_main()
    assert exit_.value.code == 0 and "--model_args" in capsys.readouterr().out
    assert get_model("maskdiff") is MaskdiffLM
