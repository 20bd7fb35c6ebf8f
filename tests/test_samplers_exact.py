"""The exact samplers are exact: by enumeration on tiny cases (V = 3, L = 3: 27 sequences).

A denoiser built from a known joint p gives the true μ: for MD4 the conditionals
E[x_l | unmasked positions] (time-independent); for a per-token schedule the posterior of x_l
given z_t at time t, p(x | z_t) ∝ p(x) Π_l [masked: 1 - α_{t,x_l}; unmasked: α_{t,x_l} 1(x_l = z_l)],
which depends on t. With it the continuous-time reverse process from "all masked at t = 1"
produces p exactly, so ``first-hitting`` and ``genmd4-exact`` must reproduce p. Each claim is a
chi-square goodness-of-fit test over all 27 sequences with a fixed seed, and each is shown to
have power: the same test, same seed, rejects a deliberately wrong variant (wrong time law,
wrong position choice, a mean α instead of the per-token schedule, a wrong rate).

A time-agnostic denoiser with exact conditionals gives p in any unmasking order at any times,
so it cannot see the time law or the position choice. A *switching* denoiser can: the exact
conditionals of p1 at t ≥ t0 and of p2 below, whose output law (enumerated below) depends on how
many positions unmask before t0 and in which order.

``ancestral`` with T steps draws from the discrete-time model with T steps, enumerated exactly
over the 4^3 states (leftover masks filled by the argmax at the end), and that law moves towards
p as T grows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from scipy import stats

import maskdiff
from exact_models import ExactConditionals
from maskdiff.sampling import sample, vocab_alpha
from maskdiff.sampling.continuous import (
    BISECTION_STEPS,
    GenMD4Exact,
    _event_loop,
    _GenMD4Envelope,
    _IntervalEnvelope,
    _ScalarEnvelope,
    time_at_mask_probability,
)

V, L = 3, 3
CONFIGS = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (27, L)
DIGITS = V ** torch.arange(L - 1, -1, -1)
DRAWS = 20_000
EXPONENTS = [0.4, 1.0, 3.0]  # GenMD4 w_j: token 2's hazard is 7.5 times token 0's


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def joint(seed: int) -> torch.Tensor:
    """A Dirichlet(1, ..., 1) joint over the 27 sequences (as ExactConditionals draws it)."""
    return ExactConditionals(V, L, seed=seed).p


def genmd4_schedule() -> maskdiff.GenMD4Schedule:
    sched = maskdiff.get_schedule("genmd4", vocab_size=V)
    with torch.no_grad():
        sched.phi.copy_(torch.log(torch.expm1(torch.tensor(EXPONENTS))))
    return sched


def counts(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount((x * DIGITS).sum(-1), minlength=len(CONFIGS)).double()


def chisquare_p(x: torch.Tensor, p: torch.Tensor) -> float:
    """p-value of the chi-square test that the rows of x (N, L) are draws from p over CONFIGS."""
    obs = counts(x)
    return float(stats.chisquare(obs.numpy(), (p / p.sum() * obs.sum()).numpy()).pvalue)


# --------------------------------------------------------------------------------------------
# Denoisers with known answers
# --------------------------------------------------------------------------------------------


class Posterior:
    """μ(z, t)_l = p(x_l | z_t = z) under the forward process of ``schedule``, by enumeration.

    For a scalar schedule the α factors are the same for every consistent x, so this is the
    time-independent exact conditional; for GenMD4 it depends on t.
    """

    def __init__(self, p: torch.Tensor, schedule):
        self.p, self.schedule = p, schedule
        self.time_conditioning = bool(getattr(schedule, "per_token", False))

    def probs(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha = vocab_alpha(self.schedule, t.double(), V).expand(len(z), V)  # (B, V)
        a = alpha[:, None, :].expand(-1, len(CONFIGS), -1).gather(2, CONFIGS[None].expand(len(z), -1, -1))  # (B, N, L)
        zz = z[:, None, :]
        masked = zz == V
        factor = torch.where(masked, 1 - a, torch.where(zz == CONFIGS[None], a, torch.zeros_like(a)))
        w = self.p[None] * factor.prod(-1)  # (B, N)
        onehot = torch.nn.functional.one_hot(CONFIGS, V).double()  # (N, L, V)
        probs = torch.einsum("bn,nlv->blv", w, onehot)
        return probs / probs.sum(-1, keepdim=True)

    def __call__(self, z, t):
        return torch.log(self.probs(z, t)).float()


class Switching:
    """Time-dependent: the exact conditionals of p1 at t ≥ t0 and of p2 at t < t0."""

    time_conditioning = True

    def __init__(self, p1, p2, t0):
        self.a = Posterior(p1, maskdiff.get_schedule("linear"))
        self.b = Posterior(p2, maskdiff.get_schedule("linear"))
        self.t0 = t0

    def __call__(self, z, t):
        late = (t >= self.t0)[:, None, None]
        return torch.where(late, self.a(z, t), self.b(z, t))


def marginal(p: torch.Tensor, subset: tuple[int, ...]) -> torch.Tensor:
    """p(x_S) for every sequence x, (27,)."""
    if not subset:
        return torch.ones(len(CONFIGS), dtype=torch.float64)
    key = CONFIGS[:, list(subset)]
    same = (key[:, None] == key[None]).all(-1).double()  # (N, N)
    return same @ p


def switching_law(p1, p2, q: float) -> torch.Tensor:
    """The continuous-time law with :class:`Switching`: K ~ Binomial(L, q) positions unmask before
    t0, a uniformly random subset S of size K, x_S ~ p1 and then x_{S^c} ~ p2( · | x_S):
    P(x) = Σ_k Binom(k) / C(L, k) Σ_{|S| = k} p1(x_S) p2(x) / p2(x_S)."""
    out = torch.zeros(len(CONFIGS), dtype=torch.float64)
    for k in range(L + 1):
        pk = math.comb(L, k) * q**k * (1 - q) ** (L - k)
        for subset in itertools.combinations(range(L), k):
            out += pk / math.comb(L, k) * marginal(p1, subset) * p2 / marginal(p2, subset)
    return out


def fraction_before(schedule, t0: float) -> float:
    """q = P(τ ≥ t0 | τ ≤ 1): a position masked at t = 1 unmasks (in reverse time) before t0."""
    a = schedule.alpha(torch.tensor([t0, 1.0], dtype=torch.float64))
    return float(1 - (1 - a[0]) / (1 - a[1]))


def ancestral_law(denoiser, schedule, num_steps: int, grid: str = "cosine") -> torch.Tensor:
    """The discrete-time model with T steps, by enumeration over the (V + 1)^L states.

    Step i: every masked position independently becomes j with probability μ_j r_j
    (r_j = (α_{s,j} - α_{t,j})/(1 - α_{t,j})) or stays masked; after the last step masks left
    are filled with the argmax of μ at the last grid time. Returns P(x) over CONFIGS.
    """
    states = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))  # (S, L)
    index = {tuple(s.tolist()): i for i, s in enumerate(states)}
    times = maskdiff.sampling.time_grid(num_steps, grid)
    dist = torch.zeros(len(states), dtype=torch.float64)
    dist[index[(V,) * L]] = 1.0
    for i in range(num_steps):
        t, s = times[i : i + 1], times[i + 1 : i + 2]
        a_t, a_s = vocab_alpha(schedule, t, V)[0], vocab_alpha(schedule, s, V)[0]  # (1,) or (V,)
        r = ((a_s - a_t) / (1 - a_t)).clamp(0, 1).expand(V)
        mu = denoiser.probs(states, t.expand(len(states)))  # (S, L, V)
        new = torch.zeros_like(dist)
        for k, state in enumerate(states.tolist()):
            if dist[k] == 0:
                continue
            options = []  # per position: [(symbol, prob)]
            for pos, sym in enumerate(state):
                if sym != V:
                    options.append([(sym, 1.0)])
                else:
                    go = [(j, float(mu[k, pos, j] * r[j])) for j in range(V)]
                    options.append(go + [(V, 1.0 - sum(pr for _, pr in go))])
            for combo in itertools.product(*options):
                new[index[tuple(c for c, _ in combo)]] += dist[k] * math.prod(pr for _, pr in combo)
        dist = new
    out = torch.zeros(len(CONFIGS), dtype=torch.float64)
    mu = denoiser.probs(states, times[-1:].expand(len(states)))
    for k, state in enumerate(states):
        filled = torch.where(state == V, mu[k].argmax(-1), state)
        out[int((filled * DIGITS).sum())] += dist[k]
    return out


# --------------------------------------------------------------------------------------------
# Deliberately wrong variants (each breaks one piece of the exact algorithm)
# --------------------------------------------------------------------------------------------


class NoPowerTime(_ScalarEnvelope):
    """Wrong time law: the next time of *one* position, 1 - α_s = (1 - α_t) u, not the first of n."""

    def propose(self, t, n, u, active):
        return super().propose(t, torch.ones_like(n), u, active)


class Leftmost(_ScalarEnvelope):
    """Wrong position choice: the leftmost masked position instead of a uniform one."""

    def position(self, weights, u):
        return (weights > 0).double().argmax(-1)


class MeanAlpha(_GenMD4Envelope):
    """Ignores the per-token schedule: one hazard w̄/t for every token (the mean exponent)."""

    def __init__(self, schedule):
        super().__init__(schedule)
        self.w_max = schedule.exponents.detach().double().mean()

    def rel(self, s):
        return None


class UniformPosition(_GenMD4Envelope):
    """Wrong position choice for per-token schedules: uniform instead of ∝ Σ_j μ_lj h_j."""

    def position(self, weights, u):
        return super().position((weights > 0).double(), u)


class TokenByMu(_GenMD4Envelope):
    """Wrong rate in the token choice: ∝ μ_j instead of ∝ μ_j h_j."""

    def token_weights(self, mu, rel):
        return mu


class AlwaysAccept(_GenMD4Envelope):
    """Wrong rate: every proposal accepted (the bound n h̄ used as the rate)."""

    def accept(self, u, n, total):
        return torch.ones_like(u, dtype=torch.bool)


@dataclass(frozen=True)
class Variant(GenMD4Exact):
    """genmd4-exact / first-hitting with one of the envelopes above (by class)."""

    envelope_class: type = _ScalarEnvelope

    def check_schedule(self, schedule):
        pass

    def run(self, ctx):
        cls = self.envelope_class
        env = cls(ctx.schedule, ctx.batch_size, ctx.device) if issubclass(cls, _ScalarEnvelope) else cls(ctx.schedule)
        _event_loop(ctx, env)


def draw(denoiser, schedule, sampler, seed, draws=DRAWS, **kw):
    return sample(denoiser, schedule, batch_size=draws, length=L, vocab_size=V, num_steps=1, sampler=sampler,
                  generator=gen(seed), **kw)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# first-hitting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine", "geometric"])
def test_first_hitting_reproduces_p_with_exact_conditionals(name):
    p = joint(0)
    sched = maskdiff.get_schedule(name)
    x, info = draw(Posterior(p, sched), sched, "first-hitting", 1, return_info=True)
    assert chisquare_p(x, p) > 1e-3
    assert info.denoiser_calls == L and info.nfe_per_sample == L and info.rejected == 0


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_first_hitting_time_law_and_order_by_a_switching_denoiser(name):
    """The law of the times and of the order matter here; the exact law is enumerated."""
    p1, p2, t0 = joint(1), joint(2), 0.5
    sched = maskdiff.get_schedule(name)
    law = switching_law(p1, p2, fraction_before(sched, t0))
    den = Switching(p1, p2, t0)
    assert chisquare_p(draw(den, sched, "first-hitting", 3), law) > 1e-3
    # Power: the same test rejects the wrong time law and the wrong position choice.
    assert chisquare_p(draw(den, sched, Variant(envelope_class=NoPowerTime), 3), law) < 1e-6
    assert chisquare_p(draw(den, sched, Variant(envelope_class=Leftmost), 3), law) < 1e-6
    assert float((law - p1).abs().sum()) > 0.1  # the law is neither p1 nor p2
    assert float((law - p2).abs().sum()) > 0.1


def test_first_hitting_event_times_follow_the_order_statistics():
    """The k-th event of L from t = 1: P(fewer than k events by s) in closed form; KS test on each."""
    sched = maskdiff.get_schedule("cosine")
    p = joint(0)
    _, info = draw(Posterior(p, sched), sched, "first-hitting", 5, return_info=True)
    times = info.extras["event_times"]  # (L, B)
    assert times.shape == (L, DRAWS) and bool((times[1:] <= times[:-1]).all())
    m1 = 1 - float(sched.alpha(torch.tensor(1.0, dtype=torch.float64)))
    for k in range(1, L + 1):
        def cdf(s, k=k):  # P(T_k ≤ s) = P(at most k - 1 of the L times are ≥ s)
            q = 1 - (1 - sched.alpha(torch.as_tensor(s, dtype=torch.float64)).numpy()) / m1
            return stats.binom.cdf(k - 1, L, q)
        assert stats.kstest(times[k - 1].numpy(), cdf).pvalue > 1e-3
    wrong = draw(Posterior(p, sched), sched, Variant(envelope_class=NoPowerTime), 5, return_info=True)[1]
    assert stats.kstest(wrong.extras["event_times"][0].numpy(), lambda s: cdf_first(sched, s, m1)).pvalue < 1e-6


def cdf_first(sched, s, m1):
    q = 1 - (1 - sched.alpha(torch.as_tensor(s, dtype=torch.float64)).numpy()) / m1
    return (1 - q) ** L


def test_first_hitting_refuses_per_token_schedules():
    with pytest.raises(ValueError, match="genmd4-exact"):
        draw(Posterior(joint(0), genmd4_schedule()), genmd4_schedule(), "first-hitting", 0)


# --------------------------------------------------------------------------------------------
# genmd4-exact
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proposals", ["envelope", "interval"])
def test_genmd4_exact_reproduces_p_with_the_per_token_posterior(proposals):
    p, sched = joint(3), genmd4_schedule()
    den = Posterior(p, sched)
    draws = DRAWS if proposals == "envelope" else DRAWS // 4  # the interval mode proposes more, without calls
    x, info = draw(den, sched, "genmd4-exact", 7, draws, proposals=proposals, return_info=True)
    assert chisquare_p(x, p) > 1e-3
    assert info.rejected > 0 and info.proposals == L * draws + info.rejected
    if proposals == "envelope":
        # Expected network-checked proposals per sequence: Σ_l E_p[w_max / w_{x_l}] (docs/samplers.md).
        w = torch.tensor(EXPONENTS, dtype=torch.float64)
        expected = float((p[:, None] * (w.max() / w[CONFIGS])).sum())
        per_row = info.proposals / DRAWS
        assert abs(per_row - expected) < 0.05 * expected, (per_row, expected)
    else:
        assert info.extras["lazy_rejected"] > 0


@pytest.mark.parametrize("variant", [MeanAlpha, UniformPosition, TokenByMu, AlwaysAccept])
def test_genmd4_exact_test_has_power_against_plausible_bugs(variant):
    p, sched = joint(3), genmd4_schedule()
    assert chisquare_p(draw(Posterior(p, sched), sched, Variant(envelope_class=variant), 7), p) < 1e-6


def test_the_posterior_depends_on_time_for_genmd4():
    """The per-token case is not trivial: μ(z, t) moves with t (it does not for MD4)."""
    p, sched = joint(3), genmd4_schedule()
    z = torch.full((2, L), V)
    mu = Posterior(p, sched).probs(z, torch.tensor([0.9, 0.1]))
    assert float((mu[0] - mu[1]).abs().max()) > 0.05
    lin = maskdiff.get_schedule("linear")
    mu = Posterior(p, lin).probs(z, torch.tensor([0.9, 0.1]))
    assert torch.allclose(mu[0], mu[1])


def test_genmd4_exact_on_scalar_schedules_is_first_hitting():
    """For a scalar schedule every proposal is accepted: the same stream gives the same tokens."""
    p, sched = joint(0), maskdiff.get_schedule("cosine")
    den = Switching(p, joint(1), 0.5)
    a, ia = sample(den, sched, batch_size=64, length=L, vocab_size=V, num_steps=1, sampler="first-hitting",
                   generator=gen(9), return_info=True)
    b, ib = sample(den, sched, batch_size=64, length=L, vocab_size=V, num_steps=1, sampler="genmd4-exact",
                   generator=gen(9), return_info=True)
    assert torch.equal(a, b) and torch.equal(ia.extras["event_times"], ib.extras["event_times"])
    assert ib.rejected == 0 and ib.denoiser_calls == L


def test_genmd4_exact_equal_exponents_accepts_everything():
    sched = maskdiff.get_schedule("genmd4", vocab_size=V, init_exponent=2.0)
    p = joint(0)
    x, info = draw(Posterior(p, sched), sched, "genmd4-exact", 11, return_info=True)
    assert info.rejected == 0 and info.denoiser_calls == L
    assert chisquare_p(x, p) > 1e-3


def test_interval_bound_must_bound_the_hazard():
    class Bad(maskdiff.GenMD4Schedule):
        def hazard_bound(self, lo, hi):
            return torch.full_like(lo, 1e-3)

    sched = Bad(V)
    with pytest.raises(RuntimeError, match="hazard_bound"):
        sample(Posterior(joint(0), genmd4_schedule()), sched, batch_size=4, length=L, vocab_size=V, num_steps=1,
               sampler="genmd4-exact", proposals="interval", generator=gen(0))


# --------------------------------------------------------------------------------------------
# ancestral: the discrete-time model with T steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_token", [False, True])
def test_ancestral_draws_from_the_T_step_model(per_token):
    p = joint(4)
    sched = genmd4_schedule() if per_token else maskdiff.get_schedule("linear")
    den = Posterior(p, sched)
    law = ancestral_law(den, sched, 2)
    x = sample(den, sched, batch_size=DRAWS, length=L, vocab_size=V, num_steps=2, generator=gen(12))
    assert chisquare_p(x, law) > 1e-3
    assert chisquare_p(x, p) < 1e-6  # with T = 2 the model is not p, and the test sees it


@pytest.mark.parametrize("per_token", [False, True])
def test_ancestral_T_step_model_moves_towards_p(per_token):
    p = joint(4)
    sched = genmd4_schedule() if per_token else maskdiff.get_schedule("linear")
    den = Posterior(p, sched)
    tv = [0.5 * float((ancestral_law(den, sched, T) - p).abs().sum()) for T in (1, 2, 4, 16, 64)]
    assert all(a > b for a, b in zip(tv, tv[1:])), tv
    assert tv[-1] < 0.1 * tv[0], tv


# --------------------------------------------------------------------------------------------
# α⁻¹
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("linear", {}), ("cosine", {}), ("polynomial", {"exponent": 2.5}),
                                         ("geometric", {})])
def test_time_at_mask_probability_inverts_alpha(name, params):
    sched = maskdiff.get_schedule(name, **params)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    m = 1 - sched.alpha(t)
    closed = time_at_mask_probability(sched, m)
    assert torch.allclose(closed, t, atol=1e-9)

    class Opaque(type(sched)):  # a subclass gets no closed form: bisection
        pass

    bisect = time_at_mask_probability(Opaque(**params), m)
    assert torch.allclose(bisect, t, atol=1e-12) and BISECTION_STEPS >= 53
    # Outside [1 - α(0), 1 - α(1)]: the ends.
    assert time_at_mask_probability(sched, torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist() == [0.0, 1.0]


def test_interval_envelope_is_used_for_custom_per_token_schedules():
    class Bounded(maskdiff.GenMD4Schedule):
        def hazard_bound(self, lo, hi):
            return self.exponents.detach().double().max() / lo

    sched = Bounded(V)
    with torch.no_grad():
        sched.phi.copy_(genmd4_schedule().phi)
    p = joint(3)
    x, info = draw(Posterior(p, sched), sched, "genmd4-exact", 13, DRAWS // 4, return_info=True)
    assert chisquare_p(x, p) > 1e-3 and info.extras["lazy_rejected"] > 0
    assert isinstance(_IntervalEnvelope(sched, V, 2, torch.device("cpu")).bound, torch.Tensor)
