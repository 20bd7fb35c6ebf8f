"""The MD4, GenMD4 and AR objectives against exact values (docs/math.md, "Identities the tests check").

Most checks use ``ExactConditionals``: a denoiser returning the exact conditionals of a known
joint p over V^L sequences, for which the continuous-time NELBO equals -log p(x) (identity 2).
Monte Carlo checks compare means with exact values within 4 standard errors, fixed seeds.
"""

import math

import numpy as np
import pytest
import torch

import maskdiff
from exact_models import (
    ExactConditionals,
    any_order_ar_value,
    mask_patterns,
    masked_ce_per_pattern,
    pattern_probabilities,
)
from maskdiff.losses import ar_nll_terms, genmd4_diffusion_integrand, genmd4_losses, md4_loss_terms, md4_nelbo
from maskdiff.metrics import mean_estimate
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import Transformer, TransformerConfig
from maskdiff.schedules import GenMD4Schedule

V, L = 3, 4
EPS = 1e-4


@pytest.fixture(scope="module")
def exact():
    return ExactConditionals(V, L, seed=0)


@pytest.fixture(scope="module")
def x_seq():
    return torch.tensor([2, 0, 1, 1])


def gauss_legendre(a: float, b: float, n: int):
    nodes, weights = np.polynomial.legendre.leggauss(n)
    t = 0.5 * (b - a) * torch.tensor(nodes) + 0.5 * (b + a)
    return t, 0.5 * (b - a) * torch.tensor(weights)


def exact_continuous_diffusion(denoiser, x, schedule, n_nodes=400):
    """∫_0^1 w(t) Σ_M q(M | t) CE(M) dt by Gauss–Legendre quadrature and pattern enumeration.

    Integrated in u = √t (dt = 2u du) so that t^(-1/2) behaviour at 0 (polynomial k = 0.5) is smooth.
    """
    u, wu = gauss_legendre(0.0, 1.0, n_nodes)
    t, wq = u**2, wu * 2 * u
    ce = masked_ce_per_pattern(denoiser, x)  # (P,)
    mask_prob = (1 - schedule.alpha(t))[:, None].expand(-1, x.numel())  # (n, L)
    expected_ce = pattern_probabilities(mask_prob) @ ce  # (n,)
    return float((wq * schedule.weight(t) * expected_ce).sum())


def exact_discrete_diffusion(denoiser, x, schedule, num_steps):
    """Σ_{i=1..T} (α_s - α_t)/(1 - α_t) · E_{q(M|t_i)}[CE(M)] by enumeration."""
    ce = masked_ce_per_pattern(denoiser, x)
    i = torch.arange(1, num_steps + 1, dtype=torch.float64)
    t, s = i / num_steps, (i - 1) / num_steps
    a_t, a_s = schedule.alpha(t), schedule.alpha(s)
    mask_prob = (1 - a_t)[:, None].expand(-1, x.numel())
    return float(((a_s - a_t) / (1 - a_t) * (pattern_probabilities(mask_prob) @ ce)).sum())


def boundary_terms(schedule, length, vocab):
    """Reconstruction L(1-α(0))log V plus prior Lα(1)log V."""
    a0 = schedule.alpha(torch.tensor(0.0, dtype=torch.float64)).item()
    a1 = schedule.alpha(torch.tensor(1.0, dtype=torch.float64)).item()
    return length * (1 - a0) * math.log(vocab) + length * a1 * math.log(vocab)


def mc_nelbo(denoiser, x, schedule, n, seed, num_steps=None, batch=5000, key="nelbo"):
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n // batch):
        xb = x.expand(batch, -1)
        values.append(md4_loss_terms(denoiser, xb, schedule, num_steps=num_steps, generator=g, vocab_size=V)[key])
    return mean_estimate(torch.cat(values))


# ---------------------------------------------------------------------------------------------
# Identity 2: the any-order autoregressive form, and the MD4 estimator that must agree with it.


@pytest.mark.parametrize("x", [[2, 0, 1, 1], [0, 0, 0, 0], [1, 2, 0, 2]])
def test_any_order_autoregressive_form_equals_log_likelihood(exact, x):
    x = torch.tensor(x)
    assert any_order_ar_value(exact, x) == pytest.approx(-exact.log_p(x[None]).item(), abs=1e-9)


def test_continuous_nelbo_by_quadrature_equals_log_likelihood(exact, x_seq):
    """NELBO_ε = -log p(x) + ε·c1 + O(ε²), with c1 and the O(ε²) bound derived from identity 1.

    With α running from 1 - ε down to ε, identity 1 gives L_∞ = ∫_ε^{1-ε} g(a) da with
    g(a) = E_{q_a}[Σ_masked CE] / (1 - a), and -log p(x) = ∫_0^1 g(a) da (identity 2), so

        NELBO_ε + log p(x) = 2 L ε log V - ∫_0^ε g - ∫_{1-ε}^1 g.

    g(0) = Σ_i -log p(x^i) (everything masked) and g(1⁻) = Σ_i -log p(x^i | x^{-i}) (one position
    masked), hence c1 = 2 L log V - g(0) - g(1⁻). The remainder of each end is at most
    ε²/2 · sup|g'|, and g(a) = Σ_M (1-a)^{|M|-1} a^{L-|M|} CE(M) has |g'| ≤ (L - 1) Σ_M CE(M).
    """
    sched = maskdiff.get_schedule("linear", eps=EPS)
    value = exact_continuous_diffusion(exact, x_seq, sched) + boundary_terms(sched, L, V)
    nll = -exact.log_p(x_seq[None]).item()
    ce = masked_ce_per_pattern(exact, x_seq)  # (2^L,)
    masked_count = mask_patterns(L).sum(-1)
    c1 = 2 * L * math.log(V) - ce[masked_count == L].item() - ce[masked_count == 1].sum().item()
    remainder = EPS**2 * (L - 1) * ce.sum().item()  # ≈ 7e-7 nats; the ε·c1 term is ≈ 4e-4
    assert abs(value - nll - EPS * c1) < remainder + 1e-9, (value - nll, EPS * c1, remainder)
    assert abs(value - nll) > 100 * remainder  # the check resolves the ε correction itself


def test_md4_nelbo_monte_carlo_matches_log_likelihood(exact, x_seq):
    sched = maskdiff.get_schedule("linear", eps=EPS)
    est = mc_nelbo(exact, x_seq, sched, n=100_000, seed=0)
    exact_value = exact_continuous_diffusion(exact, x_seq, sched) + boundary_terms(sched, L, V)
    nll = -exact.log_p(x_seq[None]).item()
    assert abs(est.mean - exact_value) < 4 * est.stderr, (est, exact_value)
    assert abs(est.mean - nll) < 4 * est.stderr + 3e-3, (est, nll)
    assert est.stderr < 0.05 * nll, "the check must be sharp enough to catch a wrong weight"


def test_md4_nelbo_public_signature_with_plain_function(exact, x_seq):
    """A plain function (no vocab_size attribute) works: V is read from its output."""

    def denoiser(z, t):
        assert z.dtype == torch.long and t.shape == (z.shape[0],)
        return exact(z, t)

    out = maskdiff.md4_nelbo(denoiser, x_seq.expand(6, -1), maskdiff.get_schedule("cosine"),
                             generator=torch.Generator().manual_seed(0))
    assert out.shape == (6,) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_discrete_time_decreases_towards_continuous(exact, x_seq):
    sched = maskdiff.get_schedule("linear", eps=EPS)
    cont = exact_continuous_diffusion(exact, x_seq, sched)
    values = [exact_discrete_diffusion(exact, x_seq, sched, T) for T in (1, 2, 4, 16, 256)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] > cont
    assert values[-1] - cont < 0.01 * (values[0] - cont)
    # The Monte Carlo estimator of L_T agrees with the exact value.
    for T, exact_T in ((1, values[0]), (4, values[2])):
        est = mc_nelbo(exact, x_seq, sched, n=40_000, seed=T, num_steps=T, key="diffusion")
        assert abs(est.mean - exact_T) < 4 * est.stderr, (T, est, exact_T)


# ---------------------------------------------------------------------------------------------
# Identity 1: schedule invariance for a time-agnostic denoiser.

INVARIANT_SPECS = [("linear", {}), ("cosine", {}), ("polynomial", {"exponent": 2.0}),
                   ("polynomial", {"exponent": 0.5}), ("geometric", {})]


def test_schedule_invariance_exact_by_quadrature(exact, x_seq):
    values = []
    for name, params in INVARIANT_SPECS:
        sched = maskdiff.get_schedule(name, eps=EPS, **params)
        values.append(exact_continuous_diffusion(exact, x_seq, sched, n_nodes=2000))
    # Equal up to quadrature error, except that geometric's α(0) sits 1e-5 lower (α̃(0) = exp(-β_min)).
    assert max(values[:4]) - min(values[:4]) < 1e-8, values
    assert abs(values[4] - values[0]) < 1e-4, values


def test_schedule_invariance_monte_carlo(exact, x_seq):
    estimates = [
        mc_nelbo(exact, x_seq, maskdiff.get_schedule(name, eps=EPS, **params), n=50_000, seed=10 + k)
        for k, (name, params) in enumerate(INVARIANT_SPECS[:3])
    ]
    for a in estimates:
        for b in estimates:
            assert abs(a.mean - b.mean) < 4 * math.hypot(a.stderr, b.stderr), estimates


def test_a_wrong_weight_is_detected(exact, x_seq):
    """Power check: dropping the 1/(1-α) factor of w(t) moves the estimate far outside 4 SE."""

    class HalfWeight:
        def __init__(self, base):
            self.base, self.eps = base, base.eps

        def alpha(self, t, tokens=None):
            return self.base.alpha(t, tokens)

        def weight(self, t, tokens=None):
            return -self.base.alpha_prime(t, tokens)  # wrong: missing / (1 - α)

    sched = maskdiff.get_schedule("cosine", eps=EPS)
    good = mc_nelbo(exact, x_seq, sched, n=20_000, seed=3)
    bad = mc_nelbo(exact, x_seq, HalfWeight(sched), n=20_000, seed=3)
    assert abs(bad.mean - good.mean) > 8 * math.hypot(good.stderr, bad.stderr)


# ---------------------------------------------------------------------------------------------
# Identities 3 and 4: uniform and perfect denoisers.


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_uniform_denoiser_gives_L_log_V_times_alpha_range(name):
    vocab, length, batch = 27, 16, 4000
    sched = maskdiff.get_schedule(name, eps=EPS)
    uniform = lambda z, t: torch.zeros(*z.shape, vocab)  # noqa: E731
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, vocab, (batch, length), generator=g)
    draws = torch.cat([
        md4_loss_terms(uniform, x, sched, generator=g, vocab_size=vocab)["diffusion"] for _ in range(10)
    ])
    est = mean_estimate(draws)
    a0 = sched.alpha(torch.tensor(0.0, dtype=torch.float64)).item()
    a1 = sched.alpha(torch.tensor(1.0, dtype=torch.float64)).item()
    expected = length * math.log(vocab) * (a0 - a1)
    assert abs(est.mean - expected) < 4 * est.stderr, (est, expected)
    # In bits per character: log2(27) ≈ 4.755.
    assert maskdiff.metrics.bits_per_token(expected, length) == pytest.approx(math.log2(27), abs=1e-3)


@pytest.mark.parametrize("num_steps", [None, 10])
def test_perfect_denoiser_gives_zero_diffusion(num_steps):
    vocab, length = 11, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (64, length), generator=g)

    def perfect(z, t):
        return torch.nn.functional.one_hot(x, vocab).float() * 1e4 - 5e3

    sched = maskdiff.get_schedule("linear")
    terms = md4_loss_terms(perfect, x, sched, num_steps=num_steps, generator=g, vocab_size=vocab)
    assert terms["num_masked"].sum() > 0
    assert torch.equal(terms["diffusion"], torch.zeros(64))
    torch.testing.assert_close(terms["nelbo"], terms["reconstruction"] + terms["prior"])
    torch.testing.assert_close(terms["reconstruction"], torch.full((64,), length * EPS * math.log(vocab)))


def test_bad_inputs_raise_clear_errors(exact):
    sched = maskdiff.get_schedule("linear")
    with pytest.raises(ValueError, match="token id 3 but the vocabulary has V=3"):
        md4_nelbo(exact, torch.tensor([[0, 3, 1, 1]]), sched)
    with pytest.raises(TypeError, match="integer token ids"):
        md4_nelbo(exact, torch.zeros(1, 4), sched)
    with pytest.raises(ValueError, match="expected"):
        md4_nelbo(lambda z, t: torch.zeros(z.shape[0], V), torch.zeros(1, 4, dtype=torch.long), sched, vocab_size=V)
    with pytest.raises(TypeError, match="per-token GenMD4 schedule"):
        genmd4_losses(exact, torch.zeros(1, 4, dtype=torch.long), sched)


def test_loss_backpropagates_to_denoiser_parameters():
    vocab, length = 5, 8
    emb = torch.nn.Embedding(vocab + 1, vocab)
    x = torch.randint(0, vocab, (16, length), generator=torch.Generator().manual_seed(0))
    loss = md4_nelbo(lambda z, t: emb(z), x, maskdiff.get_schedule("linear"),
                     generator=torch.Generator().manual_seed(1), vocab_size=vocab).mean()
    loss.backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# GenMD4


def test_genmd4_integrand_with_equal_exponents_is_polynomial_md4():
    vocab, k = 6, 2.5
    sched = GenMD4Schedule(vocab, init_exponent=k)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, vocab, generator=g)
    x = torch.randint(0, vocab, (4, 10), generator=g)
    masked = torch.rand(4, 10, generator=g) < 0.5
    t = torch.tensor([0.1, 0.3, 0.6, 0.95])
    gen = genmd4_diffusion_integrand(logits, x, masked, t, sched)
    ce = maskdiff.losses.masked_cross_entropy(logits, x, masked).sum(1)
    poly = maskdiff.get_schedule("polynomial", exponent=k, eps=0)
    torch.testing.assert_close(gen, poly.weight(t) * ce, rtol=1e-5, atol=1e-5)


def genmd4_integrand_reference(logits, x, patterns, t, w):
    """Σ_{i masked} (w_x/t)(-log μ_x - 1) + Σ_j (w_j/t) μ_j per pattern, written out in float64
    (independent of the library's integrand): logits (P, L, V), x (L,), patterns (P, L), t scalar."""
    log_mu = torch.log_softmax(logits.double(), -1)
    w = w.double()
    log_mu_x = log_mu[:, torch.arange(x.numel()), x]  # (P, L)
    per_position = (w[x] * (-log_mu_x - 1.0) + (log_mu.exp() * w).sum(-1)) / t
    return (per_position * patterns).sum(-1)


def genmd4_reconstruction_reference(x, w, eps, t1):
    """Σ_i P(x^i masked at t1) · -log P(a mask at t1 hides x^i), in float64."""
    w = w.double()
    p_masked = (1 - eps) * t1 ** w  # (V,): probability that token j is masked at t1
    return -(p_masked[x] * torch.log(p_masked[x] / p_masked.sum())).sum()


def exact_genmd4_nelbo(denoiser, x, sched, t1=1e-3, n_nodes=96):
    """Exact GenMD4 NELBO (differentiable in φ) by enumeration and quadrature in log t."""
    s, ws = gauss_legendre(math.log(t1), 0.0, n_nodes)
    t = torch.exp(s)  # (n,) float64
    patterns = mask_patterns(x.numel())  # (P, L)
    z = torch.where(patterns, torch.full_like(x, denoiser.vocab_size)[None], x[None])
    logits = denoiser(z, None)  # (P, L, V), time-agnostic
    w = sched.exponents
    mask_prob = (1 - sched.eps) * t[:, None] ** w.double()[x][None, :]  # (n, L)
    probs = pattern_probabilities(mask_prob)  # (n, P)
    total = 0.0
    for n in range(len(t)):
        ell = genmd4_integrand_reference(logits, x, patterns, t[n], w)  # (P,)
        total = total + ws[n] * t[n] * (probs[n] @ ell)  # dt = t ds
    recon = genmd4_reconstruction_reference(x, w, sched.eps, t1)
    prior = x.numel() * sched.eps * math.log(denoiser.vocab_size)
    return total + recon + prior


@pytest.fixture(scope="module")
def genmd4_case():
    model = ExactConditionals(3, 3, seed=1)  # an imperfect denoiser for the data below
    sched = GenMD4Schedule(3, eps=EPS)
    with torch.no_grad():
        sched.phi.copy_(torch.tensor([-0.5, 0.8, 2.0]))
    return model, sched, torch.tensor([0, 2, 1])


def test_genmd4_nelbo_monte_carlo_matches_exact(genmd4_case):
    model, sched, x = genmd4_case
    exact_value = exact_genmd4_nelbo(model, x, sched).item()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = torch.cat([genmd4_losses(model, x.expand(4000, -1), sched, generator=g)["nelbo"] for _ in range(10)])
    est = mean_estimate(draws)
    assert abs(est.mean - exact_value) < 4 * est.stderr, (est, exact_value)


def test_genmd4_rloo_gradient_is_unbiased(genmd4_case):
    model, sched, x = genmd4_case
    sched.zero_grad()
    exact_value = exact_genmd4_nelbo(model, x, sched)
    (exact_grad,) = torch.autograd.grad(exact_value, sched.phi)

    g = torch.Generator().manual_seed(1)
    rloo, naive = [], []
    for _ in range(150):
        terms = genmd4_losses(model, x.expand(400, -1), sched, generator=g)
        (gr,) = torch.autograd.grad(terms["surrogate"].mean(), sched.phi, retain_graph=True)
        (gn,) = torch.autograd.grad(terms["nelbo"].mean(), sched.phi)
        rloo.append(gr)
        naive.append(gn)
    rloo, naive = torch.stack(rloo).double(), torch.stack(naive).double()
    se = rloo.std(0) / math.sqrt(len(rloo))
    assert ((rloo.mean(0) - exact_grad).abs() < 4 * se).all(), (rloo.mean(0), exact_grad, se)
    # Power check: without the REINFORCE term the gradient is visibly biased.
    se_naive = naive.std(0) / math.sqrt(len(naive))
    assert ((naive.mean(0) - exact_grad).abs() > 8 * se_naive).any(), (naive.mean(0), exact_grad)


def test_genmd4_losses_terms_shapes_and_reporting():
    vocab = 7
    sched = maskdiff.get_schedule("genmd4", vocab_size=vocab, init_exponent=1.0)
    emb = torch.nn.Embedding(vocab + 1, vocab)
    x = torch.randint(0, vocab, (8, 12), generator=torch.Generator().manual_seed(0))
    terms = maskdiff.genmd4_losses(lambda z, t: emb(z), x, sched, generator=torch.Generator().manual_seed(0))
    for key in ("surrogate", "nelbo", "diffusion", "reconstruction", "prior"):
        assert terms[key].shape == (8,) and torch.isfinite(terms[key]).all(), key
    torch.testing.assert_close(terms["nelbo"], terms["diffusion"] + terms["reconstruction"] + terms["prior"])
    terms["surrogate"].mean().backward()
    assert sched.phi.grad is not None and sched.phi.grad.abs().sum() > 0
    assert emb.weight.grad.abs().sum() > 0


def test_genmd4_bound_holds_on_average_over_the_data():
    """E_p[NELBO(x)] ≥ H(p) for any exponents: a too-small integrand would break the bound."""
    model = ExactConditionals(3, 3, seed=2)
    sched = GenMD4Schedule(3, eps=EPS)
    with torch.no_grad():
        sched.phi.copy_(torch.tensor([-1.0, 0.5, 2.5]))
        expected_nelbo = sum(
            model.p[n].item() * exact_genmd4_nelbo(model, cfg, sched).item() for n, cfg in enumerate(model.configs)
        )
    entropy = -(model.p * model.p.log()).sum().item()
    assert expected_nelbo >= entropy, (expected_nelbo, entropy)
    # ... and with equal exponents it is MD4's bound, -log p(x) for every x, except that the piece
    # over [0, t1] is replaced by the uniform reconstruction term: a difference of at most
    # L · t1 · (largest single-position CE + log V).
    flat = GenMD4Schedule(3, init_exponent=1.0, eps=EPS)
    t1 = maskdiff.losses.GENMD4_T1
    with torch.no_grad():
        for cfg in model.configs[:5]:
            value = exact_genmd4_nelbo(model, cfg, flat, n_nodes=200).item()
            z = cfg.expand(3, -1).clone()
            z[torch.arange(3), torch.arange(3)] = 3  # one position masked at a time
            single_ce = -torch.log(model.conditionals(z)[torch.arange(3), torch.arange(3), cfg]).max().item()
            tol = 3 * t1 * (single_ce + math.log(3)) + 1e-3
            assert value == pytest.approx(-model.log_p(cfg[None]).item(), abs=tol)


def spread_genmd4_schedule(vocab, seed=0):
    """A GenMD4 schedule whose exponents differ (roughly 0.1 to 5), so that the terms in the
    exponents' differences matter."""
    sched = GenMD4Schedule(vocab, eps=EPS)
    with torch.no_grad():
        sched.phi.copy_(torch.linspace(-2.0, 5.0, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))])
    return sched


def test_genmd4_uniform_denoiser_matches_an_independent_closed_form():
    """μ = 1/V everywhere: ℓ_i(t) = (w_x (log V - 1) + w̄) / t, and position i is masked with
    probability (1 - ε) t^{w_x}, so the diffusion term integrates in closed form:

        Σ_i (1 - ε) (1 - t1^{w_x}) · (log V - 1 + w̄ / w_x),      w̄ = mean_j w_j.

    No code of the library's integrand is used. Power: MD4's integrand in its place (w_x/t · CE,
    i.e. without -1 and Σ_j w_j μ_j) gives (1 - ε)(1 - t1^{w_x}) log V per position, far outside."""
    vocab, length, t1 = 8, 10, maskdiff.losses.GENMD4_T1
    sched = spread_genmd4_schedule(vocab)
    x = torch.arange(length) % vocab
    w = sched.exponents.detach().double()
    wx, log_v = w[x], math.log(vocab)
    reach = (1 - EPS) * (1 - t1**wx)  # P(masked at some time in [t1, 1]) weight per position
    boundary = float(genmd4_reconstruction_reference(x, w, EPS, t1)) + length * EPS * log_v
    closed = float((reach * (log_v - 1 + w.mean() / wx)).sum()) + boundary
    wrong = float((reach * log_v).sum()) + boundary
    uniform = lambda z, t: torch.zeros(*z.shape, vocab)  # noqa: E731
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        draws = torch.cat([genmd4_losses(uniform, x.expand(4000, -1), sched, generator=g)["nelbo"] for _ in range(5)])
    est = mean_estimate(draws)
    assert abs(est.mean - closed) < 4 * est.stderr, (est, closed)
    assert abs(est.mean - wrong) > 8 * est.stderr, (est, wrong)


class TimeDependent:
    """Logits t·A_i + B_i at position i whatever z: μ depends on t only, so every expectation
    over the masks factorises per position and integrates by quadrature in t."""

    def __init__(self, vocab, length, seed=0, flip=False):
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab
        self.a = 4.0 * torch.randn(length, vocab, generator=g, dtype=torch.float64)
        self.b = torch.randn(length, vocab, generator=g, dtype=torch.float64)
        self.flip = flip  # a denoiser that receives 1 - t: what a wrong time would look like

    def log_mu(self, t):
        """log μ at times t (n,): (n, L, V) float64."""
        return torch.log_softmax(t.double()[:, None, None] * self.a + self.b, -1)

    def __call__(self, z, t):
        t = 1.0 - t if self.flip else t
        return self.log_mu(t).float().expand(z.shape[0], -1, -1) if t.numel() == 1 else self.log_mu(t).float()


def time_dependent_exact(den, x, sched, num_steps=None):
    """MD4's diffusion term for the factorised time-dependent denoiser: ∫ -α'(t) Σ_i CE_i(t) dt
    (the masking probability 1 - α cancels w's denominator), or Σ_i (α_s - α_t) Σ CE(t_i)."""
    if num_steps is None:
        t, weight = gauss_legendre(0.0, 1.0, 200)
        weight = weight * -sched.alpha_prime(t)
    else:
        t = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
        weight = sched.alpha(t - 1.0 / num_steps) - sched.alpha(t)
    ce = -den.log_mu(t)[:, torch.arange(x.numel()), x].sum(-1)  # (n,)
    return float((weight * ce).sum())


def genmd4_time_dependent_exact(den, x, sched, t1):
    """GenMD4's diffusion term for the same denoiser: ∫_{t1}^1 Σ_i (1-ε) t^{w_x} ℓ_i(t) dt with
    ℓ_i(t) = (w_x/t)(-log μ_x - 1) + Σ_j (w_j/t) μ_j, by quadrature in log t."""
    s, ws = gauss_legendre(math.log(t1), 0.0, 200)
    t = torch.exp(s)
    w = sched.exponents.detach().double()
    log_mu = den.log_mu(t)  # (n, L, V)
    wx = w[x]
    ell = (wx * (-log_mu[:, torch.arange(x.numel()), x] - 1) + (log_mu.exp() * w).sum(-1)) / t[:, None]  # (n, L)
    p_masked = (1 - sched.eps) * t[:, None] ** wx
    return float((ws * t * (p_masked * ell).sum(-1)).sum())


@pytest.mark.parametrize("objective", ["md4", "md4-T8", "genmd4"])
def test_the_losses_pass_the_drawn_time_to_the_denoiser(objective):
    """With a denoiser that depends on t, the Monte Carlo mean matches the exact value within
    4 SE; fed 1 - t instead (as a wrong time convention would), it is more than 8 SE off."""
    vocab, length = 5, 6
    x = torch.tensor([0, 3, 1, 4, 2, 2])
    estimates = {}
    for flip in (False, True):
        den = TimeDependent(vocab, length, seed=3, flip=flip)
        g = torch.Generator().manual_seed(22)
        with torch.no_grad():
            if objective == "genmd4":
                sched = spread_genmd4_schedule(vocab, seed=1)
                draws = [genmd4_losses(den, x.expand(4000, -1), sched, generator=g)["diffusion"] for _ in range(4)]
            else:
                sched = maskdiff.get_schedule("cosine", eps=EPS)  # (linear: -α' = 1 is symmetric in t ↔ 1 - t)
                steps = 8 if objective == "md4-T8" else None
                draws = [md4_loss_terms(den, x.expand(4000, -1), sched, num_steps=steps, generator=g,
                                        vocab_size=vocab)["diffusion"] for _ in range(4)]
        estimates[flip] = mean_estimate(torch.cat(draws))
    den = TimeDependent(vocab, length, seed=3)
    if objective == "genmd4":
        exact_value = genmd4_time_dependent_exact(den, x, sched, maskdiff.losses.GENMD4_T1)
    else:
        exact_value = time_dependent_exact(den, x, sched, 8 if objective == "md4-T8" else None)
    right, flipped = estimates[False], estimates[True]
    assert abs(right.mean - exact_value) < 4 * right.stderr, (right, exact_value)
    assert abs(flipped.mean - exact_value) > 8 * flipped.stderr, (flipped, exact_value)


# ---------------------------------------------------------------------------------------------
# Score masks: the terms summed over the scored positions only (zero-shot evaluation)


def small_random_model(method, vocab=50, seq_len=16):
    """Small model with random (non-uniform) predictions, for exactness checks of the scoring."""
    torch.manual_seed(1)
    cfg = TransformerConfig(vocab_size=vocab, seq_len=seq_len, n_layers=1, d_model=32, n_heads=2,
                            causal=(method == "ar"), time_conditioning=(method != "ar"))
    schedule = maskdiff.get_schedule("genmd4", vocab_size=vocab) if method == "genmd4" else maskdiff.get_schedule(
        "cosine")
    model = MaskedDiffusion(Transformer(cfg), schedule, method)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("method, num_steps, chunked", [
    ("md4", None, True), ("md4", None, False), ("md4", 10, True), ("genmd4", None, True), ("ar", None, True)])
def test_score_mask_all_true_is_no_mask_and_complements_add_up(method, num_steps, chunked):
    model = small_random_model(method)
    model.chunked_loss = chunked
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (6, 16), generator=g)
    full = torch.ones_like(x, dtype=torch.bool)
    part = torch.rand(x.shape, generator=g) < 0.5

    def terms(mask):
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            return model(x, generator=gen, num_steps=num_steps, score_mask=mask)

    ref, all_, a, b = terms(None), terms(full), terms(part), terms(~part)
    for key in ("diffusion", "reconstruction", "prior", "nelbo"):
        torch.testing.assert_close(all_[key], ref[key], rtol=1e-6, atol=1e-5)
        # the same draws: the terms of complementary masks add up to the whole
        torch.testing.assert_close(a[key] + b[key], ref[key], rtol=1e-5, atol=1e-4)
    # Power check: a half mask really leaves terms out.
    assert (a["nelbo"] < ref["nelbo"] - 1e-3).all()


def test_score_mask_in_the_functional_losses(exact, x_seq):
    """md4_nelbo / genmd4_losses / ar_nll_terms with a plain denoiser: an all-False mask scores
    nothing, the mask's shape is checked."""
    x = x_seq.expand(4, -1).clone()
    none = torch.zeros_like(x, dtype=torch.bool)
    sched = maskdiff.get_schedule("linear")
    assert torch.equal(md4_nelbo(exact, x, sched, generator=torch.Generator().manual_seed(0), score_mask=none),
                       torch.zeros(4))
    gsched = GenMD4Schedule(V)
    g = genmd4_losses(exact, x, gsched, generator=torch.Generator().manual_seed(0), score_mask=none)
    assert torch.equal(g["nelbo"], torch.zeros(4)) and torch.equal(g["num_masked"], torch.zeros(4))
    causal = lambda z, t: torch.zeros(*z.shape, V)  # noqa: E731  uniform next-token predictions
    ar = ar_nll_terms(causal, x, score_mask=x == 1, vocab_size=V)
    torch.testing.assert_close(ar["nelbo"], (x == 1).sum(1).float() * math.log(V))
    with pytest.raises(ValueError, match="score_mask has shape"):
        md4_nelbo(exact, x, sched, score_mask=none[:, :2])

