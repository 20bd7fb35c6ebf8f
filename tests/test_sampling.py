"""The sampler (docs/math.md, "Sampling" and "GenMD4"): steps, exact draws, caching, conditioning.

Statistical checks use fixed seeds; tolerances are stated in standard errors (SE) of the
quantity tested, or as chi-square p-values against the exact law.
"""

import math
import os

import pytest
import torch
from scipy import stats
from torch import nn

import maskdiff
from exact_models import ExactConditionals
from maskdiff.sampling import (
    FLOAT32_GUMBEL_MAX,
    FREE,
    SampleInfo,
    _check_sample_args,
    _DenoiserCalls,
    ancestral_step,
    fixed_from_template,
    gumbel_max_float32,
    make_fixed,
    mean_step,
    sample,
    sample_categorical,
    time_grid,
    transform_logits,
    unmask_probability,
    vocab_alpha,
)

SCALAR_SPECS = [
    ("linear", {}),
    ("cosine", {}),
    ("polynomial", {"exponent": 2.0}),
    ("geometric", {"beta_min": 1e-5, "beta_max": 20.0}),
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module's many tiny tensor ops on one thread, then restore the setting.

    Waking the intra-op thread pool costs more than these ops themselves, and on a busy
    2-core machine it made the module several times slower (results do not depend on it).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# Dummy denoisers
# ------------------------------------------------------------------------------------------


class FixedLogits:
    """Returns the same logits (V,) or (L, V) at every position, whatever z and t; counts calls."""

    def __init__(self, logits: torch.Tensor, time_conditioning: bool = False):
        self.logits = logits.float()
        self.time_conditioning = time_conditioning
        self.calls = 0
        self.times: list[torch.Tensor] = []

    def __call__(self, z, t):
        self.calls += 1
        self.times.append(t.clone())
        b, l = z.shape
        lg = self.logits if self.logits.dim() == 2 else self.logits.expand(l, -1)
        return lg.expand(b, l, -1).clone()


def constant_denoiser(k: int, vocab_size: int):
    """A plain function (no time_conditioning attribute) that always predicts token k."""

    def den(z, t):
        lg = torch.full((*z.shape, vocab_size), -30.0)
        lg[..., k] = 0.0
        return lg

    return den


class TinyNet(nn.Module):
    """A fixed random, time-agnostic network whose output depends on all of z.

    Only embeddings, cumulative sums and elementwise products/reductions over non-batch
    dimensions: each row's output does not depend on which other rows share its batch, so
    row-wise caching can be compared bitwise with full-batch calls.
    """

    time_conditioning = False

    def __init__(self, vocab_size: int, dim: int = 8, seed: int = 0, uses_time: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.emb = nn.Parameter(torch.randn(vocab_size + 1, dim, generator=g))
        self.out = nn.Parameter(torch.randn(vocab_size, dim, generator=g))
        self.uses_time = uses_time
        if uses_time:
            self.time_conditioning = True
        self.calls = 0
        self.eval()

    def forward(self, z, t):
        self.calls += 1
        e = self.emb[z]  # (B, L, D)
        n = torch.arange(1, z.shape[1] + 1, dtype=e.dtype)[None, :, None]
        h = torch.tanh(e + e.cumsum(1) / n - e.flip(1).cumsum(1).flip(1) / n.flip(1))
        if self.uses_time:
            h = h + t[:, None, None].to(h.dtype)
        return 2.0 * (h[:, :, None, :] * self.out[None, None]).sum(-1)


class CharTokenizer:
    """a-z → 0-25, space → 26 (text8's alphabet)."""

    def encode(self, text: str) -> list[int]:
        return [26 if c == " " else ord(c) - 97 for c in text]

    def decode(self, ids) -> str:
        return "".join(" " if i == 26 else ("_" if i < 0 or i > 26 else chr(97 + i)) for i in ids)


# ------------------------------------------------------------------------------------------
# Time grids and helpers
# ------------------------------------------------------------------------------------------


def test_time_grids():
    u = time_grid(8, "uniform")
    assert u.dtype == torch.float64 and u.shape == (9,)
    torch.testing.assert_close(u, torch.tensor([(8 - i) / 8 for i in range(9)], dtype=torch.float64))
    c = time_grid(8, "cosine")
    assert c[0] == 1.0 and c[-1] == 0.0 and bool((c[1:] < c[:-1]).all())
    torch.testing.assert_close(c[1:-1], torch.cos(math.pi / 2 * (1 - u[1:-1])))
    # Cosine grid: small steps near t = 1, large near t = 0.
    assert (c[0] - c[1]) < (u[0] - u[1]) < (c[-2] - c[-1])
    with pytest.raises(ValueError, match="unknown time grid"):
        time_grid(4, "log")
    with pytest.raises(ValueError, match="positive int"):
        time_grid(0)


def test_vocab_alpha_and_unmask_probability_shapes():
    V = 5
    t = torch.tensor([1.0, 0.5], dtype=torch.float64)
    lin = maskdiff.get_schedule("linear")
    a = vocab_alpha(lin, t, V)
    assert a.shape == (2, 1) and a.dtype == torch.float64
    gs = maskdiff.get_schedule("genmd4", vocab_size=V, init_exponent=2.0)
    ag = vocab_alpha(gs, t, V)
    assert ag.shape == (2, V)
    torch.testing.assert_close(ag[1], torch.full((V,), 1 - (1 - 1e-4) * 0.25, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_alpha(gs, t, V + 1)
    r = unmask_probability(torch.tensor([0.2, 1.0]), torch.tensor([0.6, 1.0]))
    torch.testing.assert_close(r, torch.tensor([0.5, 1.0]))  # 1 - α_t = 0 → certain unmasking


# ------------------------------------------------------------------------------------------
# 1. Degenerate denoisers, conditioning, monotone masks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,precision,sched", [
    ("ancestral", "float64", "linear"),
    ("ancestral", "float32", "cosine"),
    ("mean", "float64", "linear"),
    ("mean", "float32", "geometric"),
    ("ancestral", "float64", "genmd4"),
    ("ancestral", "float32", "genmd4"),
])
def test_constant_denoiser_gives_constant_sequences(sampler, precision, sched):
    V, k = 7, 3
    schedule = maskdiff.get_schedule(sched, **({"vocab_size": V} if sched == "genmd4" else {}))
    x = sample(constant_denoiser(k, V), schedule, batch_size=4, length=12, vocab_size=V, num_steps=25,
               generator=gen(0), sampler=sampler, precision=precision)
    assert x.dtype == torch.long and x.shape == (4, 12)
    assert bool((x == k).all())


def test_fixed_tokens_never_change_and_masks_never_increase():
    V, L, B = 27, 24, 6
    tok = CharTokenizer()
    fixed = fixed_from_template("the ___ sat on the ___", tok, gap_length=[3, 5], length=L)
    net = TinyNet(V, seed=3)
    x, info = sample(net, maskdiff.get_schedule("cosine"), batch_size=B, length=L, vocab_size=V, num_steps=60,
                     generator=gen(1), fixed=fixed, return_info=True, record_every=1)
    is_fixed = fixed[0] >= 0
    traj = info.trajectory  # (T + 1, B, L)
    assert traj.shape == (61, B, L) and info.trajectory_steps == list(range(61))
    assert bool((traj[:, :, is_fixed] == fixed[0, is_fixed]).all())  # fixed from the first state on
    assert bool((x[:, is_fixed] == fixed[0, is_fixed]).all())
    masks = (traj == V).sum(-1)  # (T + 1, B)
    assert bool((masks[1:] <= masks[:-1]).all())
    torch.testing.assert_close(info.num_masked, masks)
    assert bool((masks[0] == int((~is_fixed).sum())).all())
    # A token, once unmasked, is never changed again (carry-over).
    for i in range(1, traj.shape[0]):
        was = traj[i - 1] != V
        assert bool((traj[i][was] == traj[i - 1][was]).all())
    assert bool(((x >= 0) & (x < V)).all())
    assert tok.decode(x[0].tolist()).startswith("the ")


def test_prompt_and_suffix_conditioning_with_mean_sampler_and_float32():
    V, L = 11, 16
    fixed = make_fixed(L, prefix=[1, 2, 3], suffix=[[4, 5], [6, 7]], positions={8: 9, -4: 0})
    assert fixed.shape == (2, L)
    expect = torch.full((2, L), FREE)
    expect[:, :3] = torch.tensor([1, 2, 3])
    expect[:, -2:] = torch.tensor([[4, 5], [6, 7]])
    expect[:, 8] = 9
    expect[:, 12] = 0
    torch.testing.assert_close(fixed, expect)
    for sampler, precision in [("mean", "float64"), ("ancestral", "float32"), ("mean", "float32")]:
        x = sample(TinyNet(V), maskdiff.get_schedule("linear"), batch_size=2, length=L, vocab_size=V, num_steps=30,
                   generator=gen(2), fixed=fixed, sampler=sampler, precision=precision)
        keep = fixed >= 0
        assert bool((x[keep] == fixed[keep]).all())


def test_fixed_helpers_layout_and_errors():
    tok = CharTokenizer()
    f = fixed_from_template("ab___c", tok, gap="___", gap_length=2)
    torch.testing.assert_close(f, torch.tensor([[0, 1, FREE, FREE, 2]]))
    f = fixed_from_template("___x", tok, gap_length=[3], length=6)
    torch.testing.assert_close(f, torch.tensor([[FREE, FREE, FREE, 23, FREE, FREE]]))
    with pytest.raises(ValueError, match="gaps but"):
        fixed_from_template("a___b___", tok, gap_length=[1])
    with pytest.raises(ValueError, match="length="):
        fixed_from_template("abc___", tok, gap_length=4, length=5)
    with pytest.raises(ValueError, match="overlap"):
        make_fixed(4, prefix=[1, 2, 3], suffix=[4, 5])
    with pytest.raises(ValueError, match="fixed twice"):
        make_fixed(4, prefix=[1], positions={0: 3})
    with pytest.raises(ValueError, match="outside"):
        make_fixed(4, positions={4: 1})
    # The mask id also marks a free position; out-of-range values are refused.
    V = 5
    fx = torch.tensor([[V, 1, V, FREE]])
    x = sample(constant_denoiser(2, V), maskdiff.get_schedule("linear"), batch_size=3, length=4, vocab_size=V,
               num_steps=4, generator=gen(0), fixed=fx)
    torch.testing.assert_close(x, torch.tensor([[2, 1, 2, 2]] * 3))
    with pytest.raises(ValueError, match="outside"):
        sample(constant_denoiser(2, V), maskdiff.get_schedule("linear"), batch_size=1, length=4, vocab_size=V,
               num_steps=4, fixed=torch.tensor([[V + 1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        sample(constant_denoiser(2, V), maskdiff.get_schedule("linear"), batch_size=1, length=4, vocab_size=V,
               num_steps=4, fixed=torch.zeros(1, 5, dtype=torch.long))


# ------------------------------------------------------------------------------------------
# 2. Exact categorical draws (chi-square) and float32 Gumbel truncation
# ------------------------------------------------------------------------------------------


def chisquare_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of integer samples against probs (K,); bins with expected < 5 pooled."""
    k = probs.numel()
    obs = torch.bincount(samples.flatten(), minlength=k).double()
    exp = probs.double() * samples.numel()
    small = exp < 5
    if bool(small.any()):
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
        exp = torch.cat([exp[~small], exp[small].sum()[None]])
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_one_step_token_frequencies_match_q(precision):
    V, B, L = 40, 200, 100
    q = torch.softmax(0.8 * torch.randn(V, generator=gen(5), dtype=torch.float64), 0)
    z = torch.full((B, L), V)
    # α_t = 0 → α_s = 1: every masked position unmasks, token ~ q.
    x = ancestral_step(z, torch.log(q).float().expand(B, L, V), 0.0, 1.0, generator=gen(6), precision=precision)
    assert bool((x < V).all())
    assert chisquare_p(x, q) > 1e-3
    # The mean sampler with the same step.
    x = mean_step(z, torch.log(q).float().expand(B, L, V), 0.0, 1.0, generator=gen(7), precision=precision)
    assert chisquare_p(x, q) > 1e-3


def test_genmd4_single_step_from_t1_to_t0_draws_mu():
    """GenMD4 has α_0 = 1 exactly: one step 1 → 0 unmasks everything with token ~ μ."""
    V = 30
    q = torch.softmax(torch.randn(V, generator=gen(8), dtype=torch.float64), 0)
    sched = maskdiff.get_schedule("genmd4", vocab_size=V, init_exponent=1.5)
    den = FixedLogits(torch.log(q))
    x, info = sample(den, sched, batch_size=100, length=150, vocab_size=V, num_steps=1, generator=gen(9),
                     return_info=True)
    assert info.leftover_masks == 0 and info.denoiser_calls == 1
    assert chisquare_p(x, q) > 1e-3


def test_float32_draw_is_the_reference_gumbel_max():
    """precision='float32' is argmax(log p + g), g = -log(-log u), u float32 clipped (bitwise)."""
    p = torch.softmax(torch.randn(64, 33, generator=gen(10), dtype=torch.float64), -1)
    got = sample_categorical(p, generator=gen(11), precision="float32")
    g = gen(11)
    u = torch.rand(64, 33, generator=g, dtype=torch.float32).clamp(min=torch.finfo(torch.float32).tiny, max=1 - 2**-24)
    want = torch.argmax(torch.log(p).float() + (-torch.log(-torch.log(u))), -1)
    torch.testing.assert_close(got, want)
    # The cap on the Gumbel noise: the largest float32 below 1 is 1 - 2^-24.
    top = torch.tensor(1 - 2**-24, dtype=torch.float32)
    assert float(-torch.log(-torch.log(top))) == pytest.approx(FLOAT32_GUMBEL_MAX, abs=1e-5)
    assert FLOAT32_GUMBEL_MAX == pytest.approx(16.6355, abs=1e-4)


def float32_gumbel_law_tail(logp_head: float, logp_tail: float, n_tail: int) -> float:
    """Exact P(some tail category wins) under the float32 Gumbel-max draw.

    One head category and ``n_tail`` tail categories of equal log-probability (float32 values
    as the draw sees them). torch's float32 uniforms are k·2^-24, k = 0..2^24-1, equally
    likely; every value is enumerated. The tail's best score is the max of n_tail iid scores,
    and the head (index 0) wins ties, as torch.argmax returns the first maximum.
    """
    n = 2**24
    u = (torch.arange(n, dtype=torch.float32) * 2.0**-24).clamp(min=torch.finfo(torch.float32).tiny, max=1 - 2**-24)
    g = -torch.log(-torch.log(u))
    assert bool((g[1:] >= g[:-1]).all())  # non-decreasing in u, so the scores below are sorted
    head = torch.tensor(logp_head, dtype=torch.float32) + g
    tail = torch.tensor(logp_tail, dtype=torch.float32) + g
    # P(max of n_tail iid tail scores = tail[i]) from the CDF of one score, ((i + 1)/n)^n_tail.
    cdf_max = torch.exp(n_tail * torch.log(torch.arange(1, n + 1, dtype=torch.float64) / n))
    pmf_max = torch.diff(cdf_max, prepend=torch.zeros(1, dtype=torch.float64))
    head_below = torch.searchsorted(head, tail, right=False).double() / n  # P(head score < tail score)
    return float((pmf_max * head_below).sum())


def test_float64_exact_in_the_tail_float32_truncates():
    """Head of probability 2/3 and 2^24 tail tokens sharing 1/3 (each ≈ 2e-8, log-ratio ≈ -17.3).

    A tail token wins the Gumbel race only with noise ≳ 17.3 + head noise, beyond the float32
    cap of 16.64, so the float32 draw gives the tail far less than its 1/3 (≈ 0.09, computed
    exactly by enumerating every float32 uniform), while the float64 draw is exact.
    """
    n_tail = 2**24
    probs = torch.full((1, n_tail + 1), (1 / 3) / n_tail, dtype=torch.float64)
    probs[0, 0] = 2 / 3
    p_tail = 1 / 3

    # float64: 20000 draws, tail fraction within 4 SE of 1/3; tail tokens spread over the tail.
    n64 = 20000
    x64 = sample_categorical(probs, generator=gen(12), precision="float64", num_samples=n64)[0]
    frac64 = float((x64 > 0).double().mean())
    se64 = math.sqrt(p_tail * (1 - p_tail) / n64)
    assert abs(frac64 - p_tail) < 4 * se64
    assert len(set(x64[x64 > 0].tolist())) > 0.99 * int((x64 > 0).sum())  # essentially all distinct

    # float32: the exact law of the reference draw loses most of the tail mass.
    logp = torch.log(probs[0, :2] / probs.sum()).float()
    law32 = float32_gumbel_law_tail(float(logp[0]), float(logp[1]), n_tail)
    assert 0.05 < law32 < 0.15, law32
    assert law32 < p_tail - 20 * se64  # the truncation dwarfs the float64 draw's sampling error



@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MASKDIFF_SLOW_TESTS"),
                    reason="≈ 1e9 float32 Gumbel draws (≈ 40 s); set MASKDIFF_SLOW_TESTS=1")
def test_float32_draws_lose_the_tail_empirically():
    """The same head/tail distribution, drawn through the library: float32 vs the truth 1/3.

    Each float32 draw needs 2^24 + 1 Gumbel variables: seeing an effect that lives at
    probabilities ≈ e^-17 per outcome takes ≈ 1e9 random numbers whatever the design, hence
    opt-in. Expected tail fraction ≈ 0.09 (the exact law above) against 1/3.
    """
    n_tail, n32 = 2**24, 96
    probs = torch.full((1, n_tail + 1), (1 / 3) / n_tail, dtype=torch.float64)
    probs[0, 0] = 2 / 3
    p_tail = 1 / 3
    logp = torch.log(probs[0, :2] / probs.sum()).float()
    law32 = float32_gumbel_law_tail(float(logp[0]), float(logp[1]), n_tail)
    x32 = sample_categorical(probs, generator=gen(13), precision="float32", num_samples=n32)[0]
    frac32 = float((x32 > 0).double().mean())
    assert abs(frac32 - law32) < 4 * math.sqrt(law32 * (1 - law32) / n32)
    assert frac32 < p_tail - 4 * math.sqrt(p_tail * (1 - p_tail) / n32)


# ------------------------------------------------------------------------------------------
# 3. Fraction still masked after one step
# ------------------------------------------------------------------------------------------


def binomial_ok(k: int, n: int, p: float) -> bool:
    """k successes in n trials are consistent with p: within 4 SE, or, where n·p or n·(1-p) is
    too small for the normal approximation, an exact two-sided binomial test at 6e-5 (the
    4-SE level)."""
    if min(n * p, n * (1 - p)) >= 20:
        return abs(k / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    return stats.binomtest(k, n, p).pvalue > 6e-5


@pytest.mark.parametrize("name,params", SCALAR_SPECS, ids=[n for n, _ in SCALAR_SPECS])
@pytest.mark.parametrize("sampler,precision", [("ancestral", "float64"), ("ancestral", "float32"), ("mean", "float64")])
def test_masked_fraction_scalar_schedules(name, params, sampler, precision):
    V, B, L = 6, 100, 200
    sched = maskdiff.get_schedule(name, **params)
    logits = torch.log(torch.tensor([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])).expand(B, L, V)
    step = ancestral_step if sampler == "ancestral" else mean_step
    for k, (t, s) in enumerate([(1.0, 0.97), (0.8, 0.5), (0.3, 0.05)]):
        a = vocab_alpha(sched, torch.tensor([t, s], dtype=torch.float64), V)
        z = torch.full((B, L), V)
        z[:, :10] = 2  # some unmasked positions: carried over
        x = step(z, logits, a[0:1], a[1:2], generator=gen(100 + k), precision=precision)
        assert bool((x[:, :10] == 2).all())
        frac = float((x[:, 10:] == V).double().mean())
        expect = float((1 - a[1, 0]) / (1 - a[0, 0]))
        n = B * (L - 10)
        assert binomial_ok(int((x[:, 10:] == V).sum()), n, expect), (t, s, frac, expect)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_masked_fraction_and_tokens_genmd4(precision):
    V, B, L = 6, 100, 200
    sched = maskdiff.get_schedule("genmd4", vocab_size=V, init_exponent=1.0)
    w = torch.tensor([0.3, 0.7, 1.0, 1.5, 2.5, 4.0])
    with torch.no_grad():
        sched.phi.copy_(torch.log(torch.expm1(w)))
    mu = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.1, 0.05], dtype=torch.float64)
    logits = torch.log(mu).float().expand(B, L, V)
    for k, (t, s) in enumerate([(1.0, 0.9), (0.8, 0.5), (0.3, 0.1)]):
        a = vocab_alpha(sched, torch.tensor([t, s], dtype=torch.float64), V)
        a_t, a_s = a[0], a[1]
        z = torch.full((B, L), V)
        x = ancestral_step(z, logits, a_t[None], a_s[None], generator=gen(200 + k), precision=precision)
        frac = float((x == V).double().mean())
        expect = float((mu * (1 - a_s) / (1 - a_t)).sum())
        n = B * L
        assert binomial_ok(int((x == V).sum()), n, expect), (t, s, frac, expect)
        # Unmasked tokens: ∝ μ_j (α_s,j - α_t,j)/(1 - α_t,j) — not μ, since tokens unmask at different rates.
        q = mu * (a_s - a_t) / (1 - a_t)
        assert chisquare_p(x[x < V], q / q.sum()) > 1e-3
        if k == 1:
            assert chisquare_p(x[x < V], mu) < 1e-6  # and clearly distinguishable from μ itself


# ------------------------------------------------------------------------------------------
# 4. Caching and lazy evaluation: exact, fewer calls
# ------------------------------------------------------------------------------------------


CACHE_CASES = {
    "ancestral64-eager": dict(sched="cosine", lazy=False),
    "ancestral64-genmd4": dict(sched="genmd4", lazy=False),
    "ancestral32": dict(sched="linear", precision="float32"),
    "mean64": dict(sched="linear", sampler="mean"),
    "mean32": dict(sched="polynomial", sampler="mean", precision="float32"),
    "row-scope": dict(sched="cosine", lazy=False, cache_scope="row"),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_caching_is_bitwise_exact_with_fewer_calls(case):
    opts = dict(CACHE_CASES[case])
    V, B, L, T = 12, 4, 16, 200
    name = opts.pop("sched")
    sched = maskdiff.get_schedule(name, **({"vocab_size": V} if name == "genmd4" else {}))
    kw = dict(batch_size=B, length=L, vocab_size=V, num_steps=T, return_info=True, top_p=0.95, **opts)
    x0, i0 = sample(TinyNet(V), sched, generator=gen(21), cache=False, **kw)
    x1, i1 = sample(TinyNet(V), sched, generator=gen(21), cache=True, **kw)
    torch.testing.assert_close(x0, x1, rtol=0, atol=0)
    assert i1.cache_hits > 0
    if opts.get("cache_scope") == "row":
        assert i1.denoiser_rows < i0.denoiser_rows
    else:
        assert i1.denoiser_calls < i0.denoiser_calls
    assert i1.denoiser_calls + i1.cache_hits == i0.denoiser_calls
    assert i1.nfe_per_sample < i0.nfe_per_sample <= T + 1
    # cache='auto' caches a time-agnostic network.
    x2, i2 = sample(TinyNet(V), sched, generator=gen(21), cache="auto", **kw)
    torch.testing.assert_close(x0, x2, rtol=0, atol=0)
    assert i2.denoiser_calls == i1.denoiser_calls


def test_lazy_evaluation_is_exact_for_time_conditioned_denoisers():
    V, B, L, T = 12, 3, 16, 300
    net = TinyNet(V, uses_time=True)
    kw = dict(batch_size=B, length=L, vocab_size=V, num_steps=T, return_info=True)
    for name in ["linear", "genmd4"]:
        sched = maskdiff.get_schedule(name, **({"vocab_size": V} if name == "genmd4" else {}))
        x0, i0 = sample(net, sched, generator=gen(31), lazy=False, **kw)
        x1, i1 = sample(net, sched, generator=gen(31), lazy=True, **kw)
        torch.testing.assert_close(x0, x1, rtol=0, atol=0)
        assert i0.denoiser_calls >= T and i1.denoiser_calls < i0.denoiser_calls
        assert i1.lazy_skips > 0 and i1.cache_hits == 0


def test_caching_refused_for_time_conditioned_denoisers():
    V = 5
    sched = maskdiff.get_schedule("linear")
    kw = dict(batch_size=2, length=4, vocab_size=V, num_steps=10)
    with pytest.raises(ValueError, match="time-agnostic"):
        sample(constant_denoiser(1, V), sched, cache=True, **kw)  # no attribute: time-conditioned
    with pytest.raises(ValueError, match="time-agnostic"):
        sample(TinyNet(V, uses_time=True), sched, cache=True, **kw)
    with pytest.raises(ValueError, match="contradicts"):
        sample(TinyNet(V, uses_time=True), sched, cache=True, time_agnostic=True, **kw)
    # An explicit declaration allows caching a plain function; 'auto' leaves it uncached otherwise.
    _, info = sample(constant_denoiser(1, V), sched, cache=True, time_agnostic=True, return_info=True, lazy=False,
                     generator=gen(0), **kw)
    assert info.cache_hits > 0
    _, info = sample(constant_denoiser(1, V), sched, cache="auto", return_info=True, lazy=False, generator=gen(0), **kw)
    assert info.cache_hits == 0 and info.denoiser_calls == 10


def test_denoiser_sees_grid_times_and_final_fill_uses_argmax():
    V, B, L = 6, 20, 30
    q = torch.tensor([0.1, 0.15, 0.3, 0.2, 0.15, 0.1])
    den = FixedLogits(torch.log(q), time_conditioning=True)
    grid = torch.tensor([1.0, 0.95, 0.9], dtype=torch.float64)  # stops early: most positions left masked
    x, info = sample(den, maskdiff.get_schedule("linear"), batch_size=B, length=L, vocab_size=V, num_steps=2,
                     grid=grid, generator=gen(40), lazy=False, return_info=True)
    assert info.denoiser_calls == 3 == den.calls  # two steps + the fill
    assert [float(t[0]) for t in den.times] == pytest.approx([1.0, 0.95, 0.9])
    assert all(t.dtype == torch.float32 and t.shape == (B,) for t in den.times)
    left = int(info.num_masked[-1].sum())
    assert info.leftover_masks == left > 0.8 * B * L
    assert int((x == 2).sum()) >= left  # filled with the argmax, token 2
    assert bool(((x >= 0) & (x < V)).all())


# ------------------------------------------------------------------------------------------
# 5. Logit transforms and the mean sampler
# ------------------------------------------------------------------------------------------


def test_transform_logits_top_k_top_p_temperature():
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=torch.float64)
    lg = torch.log(p)
    kept = lambda x: torch.isfinite(x[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(transform_logits(lg, top_k=2)) == [1, 3]
    assert kept(transform_logits(lg, top_p=0.5)) == [1]
    assert kept(transform_logits(lg, top_p=0.7)) == [1, 3]  # mass before token 2 is 0.8 ≥ 0.7
    assert kept(transform_logits(lg, top_p=0.81)) == [1, 2, 3]
    assert kept(transform_logits(lg, temperature=0)) == [1]
    torch.testing.assert_close(transform_logits(lg, temperature=2.0), lg / 2)
    for bad in [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ValueError):
            transform_logits(lg, **bad)


def test_top_k_top_p_and_temperature_in_sampling():
    V, B, L = 10, 50, 40
    q = torch.softmax(torch.linspace(2.0, -2.0, V, dtype=torch.float64), 0)  # token 0 most likely
    logits = torch.log(q).float().expand(B, L, V)
    z = torch.full((B, L), V)
    x = ancestral_step(z, logits, 0.0, 1.0, generator=gen(50), top_k=3)
    assert set(x.unique().tolist()) == {0, 1, 2}
    x = ancestral_step(z, logits, 0.0, 1.0, generator=gen(51), top_p=0.5)
    nucleus = int((torch.cumsum(q, 0) - q < 0.5).sum())
    assert set(x.unique().tolist()) == set(range(nucleus))
    for temp in [1e-3, 0.0]:
        x = ancestral_step(z, logits, 0.0, 1.0, generator=gen(52), temperature=temp)
        assert bool((x == 0).all())
    # Temperature 2: tokens ~ softmax(log q / 2).
    x = ancestral_step(z, logits, 0.0, 1.0, generator=gen(53), temperature=2.0)
    assert chisquare_p(x, torch.softmax(torch.log(q) / 2, 0)) > 1e-3
    # Through sample(): only top-k tokens appear.
    x = sample(FixedLogits(torch.log(q)), maskdiff.get_schedule("linear"), batch_size=8, length=32, vocab_size=V,
               num_steps=50, generator=gen(54), top_k=2)
    assert set(x.unique().tolist()) <= {0, 1}


def chisquare_p_with_zeros(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """:func:`chisquare_p` for a law with impossible outcomes: 0 if one occurred, else the
    p-value over the possible ones."""
    possible = probs > 0
    counts = torch.bincount(samples.flatten(), minlength=probs.numel())
    if bool((counts[~possible] > 0).any()):
        return 0.0
    index = torch.full((probs.numel(),), -1, dtype=torch.long)
    index[possible] = torch.arange(int(possible.sum()))
    return chisquare_p(index[samples.flatten()], probs[possible] / probs[possible].sum())


def transformed_step_law(logp, r, temperature, top_p):
    """The exact law of one step over the V + 1 outcomes (mask last): μ' = softmax(transform(log p)),
    P(j) = μ'_j r_j, P(mask) = 1 - Σ_j μ'_j r_j. r is (1,) for a scalar schedule or (V,)."""
    mu = torch.softmax(transform_logits(logp, temperature=temperature, top_p=top_p), -1)
    p_vocab = mu * r
    return torch.cat([p_vocab, 1 - p_vocab.sum(-1, keepdim=True)])


@pytest.mark.parametrize("sampler, precision, per_token", [
    ("ancestral", "float64", False), ("ancestral", "float32", False), ("ancestral", "float64", True),
    ("ancestral", "float32", True), ("mean", "float64", False), ("mean", "float32", False)])
def test_top_p_and_temperature_at_r_below_one_follow_the_exact_law(sampler, precision, per_token):
    """At r < 1 a step's law is (μ' r, 1 - Σ μ' r), not μ: checked over the V + 1 outcomes by
    chi-square (p > 1e-3), against wrong variants that must fail (p < 1e-8): the transforms left
    out, the transforms applied to the law over V + 1 outcomes (mask included), and, per token,
    the unmasking probability taken from the untransformed μ."""
    V, B, L, temperature, top_p = 6, 200, 200, 0.7, 0.7
    logp = torch.log_softmax(torch.tensor([1.2, 0.9, 0.9, 0.2, -0.5, -1.5], dtype=torch.float64), 0)
    if per_token:
        sched = maskdiff.get_schedule("genmd4", vocab_size=V)
        with torch.no_grad():
            sched.phi.copy_(torch.tensor([-2.0, -1.0, -1.5, 2.0, 2.5, 3.0]))  # kept tokens unmask slowly
        a_t, a_s = vocab_alpha(sched, torch.tensor([0.7]), V), vocab_alpha(sched, torch.tensor([0.4]), V)
    else:
        a_t, a_s = torch.tensor([[0.2]], dtype=torch.float64), torch.tensor([[0.6]], dtype=torch.float64)
    r = unmask_probability(a_t, a_s)[0]  # (1,) or (V,), all < 1
    assert bool((r < 0.9).all())
    step = ancestral_step if sampler == "ancestral" else mean_step
    x = step(torch.full((B, L), V), logp.float().expand(B, L, V), a_t, a_s, generator=gen(70 + per_token),
             precision=precision, temperature=temperature, top_p=top_p)
    law = transformed_step_law(logp, r, temperature, top_p)
    assert chisquare_p_with_zeros(x, law) > 1e-3
    plain = transformed_step_law(logp, r, 1.0, None)
    full = torch.softmax(transform_logits(torch.log(plain), temperature=temperature, top_p=top_p), -1)
    wrong = [plain, full]
    if per_token:
        p_u = (plain[:V]).sum()  # unmasking probability of the untransformed μ, token ∝ μ' r
        wrong.append(torch.cat([p_u * law[:V] / law[:V].sum(), (1 - p_u)[None]]))
    for bad in wrong:
        assert (bad - law).abs().max() > 0.02  # a different law ...
        assert chisquare_p_with_zeros(x, bad) < 1e-8  # ... that the check rejects


def test_mean_sampler_valid_and_refuses_per_token_schedules():
    V = 9
    x = sample(TinyNet(V), maskdiff.get_schedule("cosine"), batch_size=5, length=20, vocab_size=V, num_steps=40,
               generator=gen(60), sampler="mean")
    assert x.shape == (5, 20) and bool(((x >= 0) & (x < V)).all())
    with pytest.raises(ValueError, match="scalar schedule"):
        sample(TinyNet(V), maskdiff.get_schedule("genmd4", vocab_size=V), batch_size=2, length=4, vocab_size=V,
               num_steps=5, sampler="mean")
    a = torch.full((1, V), 0.5)
    with pytest.raises(ValueError, match="scalar schedule"):
        mean_step(torch.full((1, 4), V), torch.zeros(1, 4, V), a * 0.5, a)


# ------------------------------------------------------------------------------------------
# End to end: exact conditionals reproduce the joint distribution
# ------------------------------------------------------------------------------------------


class Tabulated:
    """A time-agnostic denoiser evaluated once on all (V+1)^L states, then looked up (fast)."""

    time_conditioning = False

    def __init__(self, denoiser, vocab_size: int, length: int):
        states = torch.cartesian_prod(*[torch.arange(vocab_size + 1)] * length).reshape(-1, length)
        self.radix = (vocab_size + 1) ** torch.arange(length - 1, -1, -1)
        self.table = denoiser(states, torch.zeros(len(states)))  # (S, L, V)

    def __call__(self, z, t):
        return self.table[(z * self.radix).sum(-1)]


def test_sampling_with_exact_conditionals_reproduces_the_joint():
    """With μ = the exact conditionals of p and many small steps, samples follow p.

    (Two positions unmasking in the same step are drawn independently, an O(L²/T) effect far
    below the sampling error here.) With the first token fixed, samples follow p(x | x_0).
    """
    V, L, B, T = 2, 3, 3000, 400
    exact = ExactConditionals(V, L, seed=0)
    den = Tabulated(exact, V, L)
    sched = maskdiff.get_schedule("linear")
    x = sample(den, sched, batch_size=B, length=L, vocab_size=V, num_steps=T, grid="uniform", generator=gen(70),
               cache="auto")
    idx = (x * torch.tensor([4, 2, 1])).sum(-1)
    assert chisquare_p(idx, exact.p) > 1e-3
    fixed = make_fixed(L, prefix=[1])
    x = sample(den, sched, batch_size=B, length=L, vocab_size=V, num_steps=T, grid="uniform", generator=gen(71),
               fixed=fixed, cache="auto")
    assert bool((x[:, 0] == 1).all())
    cond = exact.p[4:] / exact.p[4:].sum()  # configurations 1xx
    assert chisquare_p((x * torch.tensor([0, 2, 1])).sum(-1), cond) > 1e-3


# ------------------------------------------------------------------------------------------
# Reproducibility, precision of the schedule, argument errors
# ------------------------------------------------------------------------------------------


def test_reproducible_with_generator_and_schedule_untouched():
    V = 8
    sched = maskdiff.get_schedule("genmd4", vocab_size=V, init_exponent=0.7)
    kw = dict(batch_size=3, length=10, vocab_size=V, num_steps=30)
    a = sample(TinyNet(V), sched, generator=gen(80), **kw)
    b = sample(TinyNet(V), sched, generator=gen(80), **kw)
    c = sample(TinyNet(V), sched, generator=gen(81), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert sched.phi.dtype == torch.float32 and sched.phi.requires_grad  # evaluated on a float64 copy


def test_progress_bar_and_errors(capsys):
    V = 5
    sched = maskdiff.get_schedule("linear")
    den = constant_denoiser(0, V)
    kw = dict(batch_size=1, length=4, vocab_size=V, num_steps=3)
    sample(den, sched, progress=True, generator=gen(0), **kw)
    assert "sampling" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected"):
        sample(lambda z, t: torch.zeros(1, 4, V + 1), sched, **kw)  # mask logit included
    with pytest.raises(ValueError, match="sampler"):
        sample(den, sched, sampler="greedy", **kw)
    with pytest.raises(ValueError, match="precision"):
        sample(den, sched, precision="float16", **kw)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(den, sched, grid=torch.tensor([1.0, 0.5, 0.5, 0.0]), **kw)
    with pytest.raises(ValueError, match="shape"):
        sample(den, sched, grid=torch.tensor([1.0, 0.0]), **kw)
    with pytest.raises(ValueError, match="NaN"):
        sample(lambda z, t: torch.full((1, 4, V), float("nan")), sched, **kw)
    with pytest.raises(ValueError, match="cache"):
        sample(den, sched, cache="yes", **kw)
    with pytest.raises(TypeError):
        sample(den, sched, bogus_option=1, **kw)
    with pytest.raises(ValueError, match="backwards"):
        ancestral_step(torch.full((1, 3), V), torch.zeros(1, 3, V), 0.8, 0.2)
    with pytest.raises(ValueError, match="vocab_size"):
        ancestral_step(torch.full((1, 3), V), lambda: torch.zeros(1, 3, V), 0.2, 0.8)
    with pytest.raises(ValueError, match="non-negative"):
        sample_categorical(torch.tensor([0.5, -0.1]))
    with pytest.warns(UserWarning, match="training mode"):
        sample(TinyNet(V).train(), sched, generator=gen(0), **kw)


def test_gumbel_max_float32_shapes():
    lg = torch.zeros(3, 4, 5)
    out = gumbel_max_float32(lg, gen(0))
    assert out.shape == (3, 4) and out.dtype == torch.long
    many = sample_categorical(torch.ones(2, 5), generator=gen(1), num_samples=7)
    assert many.shape == (2, 7)


# ------------------------------------------------------------------------------------------
# The sampler's pieces: argument checks, denoiser-call bookkeeping, SampleInfo.record
# ------------------------------------------------------------------------------------------


def sample_args(**changes):
    """Valid keyword arguments of _check_sample_args (sample()'s defaults), with ``changes``."""
    kw = dict(batch_size=2, length=4, vocab_size=5, num_steps=3, sampler="ancestral", temperature=1.0, top_k=None,
              top_p=None, precision="float64", cache=False, cache_scope="batch", time_agnostic=None, generator=None,
              device=None, return_info=False, record_every=None)
    kw.update(changes)
    return kw


@pytest.mark.parametrize("name,value", [
    ("batch_size", 0), ("batch_size", 2.0), ("length", -1), ("length", True), ("vocab_size", 0),
    ("num_steps", 0), ("num_steps", 1.5), ("sampler", "greedy"), ("temperature", -0.5),
    ("temperature", float("inf")), ("top_k", 0), ("top_k", 2.0), ("top_p", 0.0), ("top_p", 1.5),
    ("precision", "float16"), ("cache", "yes"), ("cache", None), ("cache_scope", "column"),
    ("record_every", 0), ("record_every", True),
])
def test_check_sample_args_names_each_bad_argument(name, value):
    V = 5
    with pytest.raises(ValueError, match=name):
        _check_sample_args(TinyNet(V), maskdiff.get_schedule("linear"), **sample_args(**{name: value}))


def test_check_sample_args_combinations_and_resolution():
    V = 5
    lin, gs = maskdiff.get_schedule("linear"), maskdiff.get_schedule("genmd4", vocab_size=V)
    agnostic, conditioned, plain = TinyNet(V), TinyNet(V, uses_time=True), constant_denoiser(0, V)
    check = _check_sample_args
    with pytest.raises(ValueError, match="return_info=True"):
        check(agnostic, lin, **sample_args(record_every=2))
    assert check(agnostic, lin, **sample_args(record_every=2, return_info=True)) == (False, torch.device("cpu"))
    with pytest.raises(ValueError, match="'mean' sampler needs a scalar schedule"):
        check(agnostic, gs, **sample_args(sampler="mean"))
    for den in (conditioned, plain):  # declared time-conditioned, and no declaration at all
        with pytest.raises(ValueError, match="cache=True needs a time-agnostic denoiser"):
            check(den, lin, **sample_args(cache=True))
    with pytest.raises(ValueError, match="time_agnostic=True contradicts"):
        check(conditioned, lin, **sample_args(time_agnostic=True))
    with pytest.raises(ValueError, match="generator is on cpu but sampling runs on meta"):
        check(agnostic, lin, **sample_args(generator=gen(0), device="meta"))
    # cache="auto" caches exactly the time-agnostic denoisers; an int counts as a bool.
    assert check(agnostic, lin, **sample_args(cache="auto"))[0] is True
    assert check(conditioned, lin, **sample_args(cache="auto"))[0] is False
    assert check(plain, lin, **sample_args(cache="auto"))[0] is False
    assert check(plain, lin, **sample_args(cache=1, time_agnostic=True))[0] is True
    assert check(agnostic.forward, lin, **sample_args(cache=True))[0] is True  # bound method: owner's attribute
    # Device: the argument, else the denoiser's parameters, else the CPU.
    assert check(plain, lin, **sample_args(device="meta"))[1] == torch.device("meta")
    assert check(TinyNet(V).to("meta"), lin, **sample_args())[1] == torch.device("meta")
    assert check(plain, lin, **sample_args())[1] == torch.device("cpu")
    with pytest.warns(UserWarning, match="training mode"):
        check(TinyNet(V).train(), lin, **sample_args())


class RecordingDenoiser:
    """TinyNet's logits (row-independent), remembering the z and t of every call."""

    def __init__(self, vocab_size: int, logits=None):
        self.net = TinyNet(vocab_size)
        self.logits = logits
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, z, t):
        self.seen.append((z.clone(), t.clone()))
        return self.net(z, t) if self.logits is None else self.logits(z)


def test_denoiser_calls_count_and_pass_times_without_cache():
    V, B, L = 6, 3, 5
    den = RecordingDenoiser(V)
    calls = _DenoiserCalls(den, B, L, V)
    z = torch.full((B, L), V)
    a = calls(z, torch.tensor(0.75, dtype=torch.float64))
    b = calls(z, torch.tensor(0.5, dtype=torch.float64))
    assert (calls.calls, calls.rows, calls.cache_hits, calls.requests) == (2, 2 * B, 0, 2)
    assert a.shape == (B, L, V) and a is not b and calls.cached is None
    assert [t.tolist() for _, t in den.seen] == [[0.75] * B, [0.5] * B]
    assert all(t.dtype == torch.float32 for _, t in den.seen)


def test_denoiser_calls_cache_hit_when_no_row_changed():
    V, B, L = 6, 3, 5
    den = RecordingDenoiser(V)
    calls = _DenoiserCalls(den, B, L, V, use_cache=True)
    z = torch.full((B, L), V)
    first = calls(z, torch.tensor(1.0))
    again = calls(z, torch.tensor(0.5))  # time-agnostic: t does not matter
    assert again is first and len(den.seen) == 1
    assert (calls.calls, calls.rows, calls.cache_hits, calls.requests) == (1, B, 1, 2)
    calls.changed(z, z.clone())  # a step that changed nothing keeps the cache valid
    assert calls(z, torch.tensor(0.25)) is first and calls.cache_hits == 2 and len(den.seen) == 1


@pytest.mark.parametrize("scope", ["row", "batch"])
def test_denoiser_calls_recompute_dirty_rows(scope):
    V, B, L = 6, 4, 5
    den = RecordingDenoiser(V)
    calls = _DenoiserCalls(den, B, L, V, use_cache=True, cache_scope=scope)
    z = torch.full((B, L), V)
    before = calls(z, torch.tensor(1.0)).clone()
    z_new = z.clone()
    z_new[1, 2] = 3
    z_new[3, 0] = 1
    calls.changed(z, z_new)
    assert calls.dirty.tolist() == [False, True, False, True]
    out = calls(z_new, torch.tensor(0.5))
    z_seen, t_seen = den.seen[-1]
    if scope == "row":  # only the changed rows go to the network
        assert torch.equal(z_seen, z_new[[1, 3]]) and t_seen.shape == (2,)
        assert (calls.calls, calls.rows) == (2, B + 2)
    else:
        assert torch.equal(z_seen, z_new) and (calls.calls, calls.rows) == (2, 2 * B)
    assert not bool(calls.dirty.any()) and calls.cache_hits == 0
    torch.testing.assert_close(out, den.net(z_new, torch.zeros(B)), rtol=0, atol=0)  # equals a full call
    torch.testing.assert_close(out[[0, 2]], before[[0, 2]], rtol=0, atol=0)
    assert not torch.equal(out[[1, 3]], before[[1, 3]])
    # Every row changed: one full-batch call even with row scope.
    z_all = z_new.clone()
    z_all[:, 4] = 0
    calls.changed(z_new, z_all)
    calls(z_all, torch.tensor(0.25))
    assert torch.equal(den.seen[-1][0], z_all) and calls.calls == 3


def test_denoiser_calls_reject_non_finite_and_misshaped_logits():
    V, B, L = 4, 2, 3
    z = torch.full((B, L), V)
    t = torch.tensor(0.5)

    def with_value(i, value):
        def logits(z):
            lg = torch.zeros(B, L, V)
            lg.view(-1)[i] = value
            return lg
        return logits

    for bad in (with_value(5, float("nan")), with_value(0, float("inf")),
                lambda z: torch.zeros(B, L, V).index_fill_(1, torch.tensor([1]), -math.inf)):
        with pytest.raises(ValueError, match=r"NaN/\+inf logits or a row with every logit -inf"):
            _DenoiserCalls(RecordingDenoiser(V, logits=bad), B, L, V)(z, t)
    ok = _DenoiserCalls(RecordingDenoiser(V, logits=with_value(3, -math.inf)), B, L, V)(z, t)  # one -inf is fine
    assert ok.shape == (B, L, V)
    with pytest.raises(ValueError, match=r"expected \(B, L, V\)"):
        _DenoiserCalls(RecordingDenoiser(V, logits=lambda z: torch.zeros(B, L, V + 1)), B, L, V)(z, t)
    _DenoiserCalls.check_finite(torch.tensor([[0.0, -math.inf]]))  # static: usable on its own
    with pytest.raises(ValueError):
        _DenoiserCalls.check_finite(torch.tensor([[-math.inf, -math.inf]]))


def test_sample_info_record_counts_masks_and_keeps_states():
    V, B, L = 5, 2, 3
    info = SampleInfo(num_steps=5, batch_size=B, vocab_size=V, record_every=2)
    z = torch.full((B, L), V)
    for step in range(6):
        if step:
            z = z.clone()
            z[step % B, (step - 1) % L] = 0
        info.record(step, z)
    info._finish()
    assert info.trajectory_steps == [0, 2, 4, 5]  # every second step and the last
    assert info.trajectory.shape == (4, B, L) and torch.equal(info.trajectory[-1], z)
    assert info.num_masked.shape == (6, B) and info.num_masked[0].tolist() == [L, L]
    assert info.num_masked[-1].tolist() == (z == V).sum(1).tolist()
    plain = SampleInfo(num_steps=1, batch_size=B, vocab_size=V)
    plain.record(0, z)
    plain._finish()
    assert plain.trajectory is None and plain.trajectory_steps == []
    with pytest.raises(ValueError, match="vocab_size"):
        SampleInfo(num_steps=1).record(0, z)
