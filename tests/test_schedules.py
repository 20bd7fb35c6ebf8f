"""Schedules and the forward process (docs/math.md, "Schedules" and "Forward process")."""

import math

import pytest
import torch

import maskdiff
from maskdiff.forward import discretize_time, forward_sample, rescale_time, sample_times
from maskdiff.schedules import GenMD4Schedule, ScalarSchedule

EPS = 1e-4
SCALAR_SPECS = [
    ("linear", {}),
    ("cosine", {}),
    ("polynomial", {"exponent": 2.0}),
    ("polynomial", {"exponent": 0.5}),
    ("geometric", {"beta_min": 1e-5, "beta_max": 20.0}),
]
IDS = [f"{n}{p.get('exponent', '')}" for n, p in SCALAR_SPECS]


def closed_form_alpha_tilde(name, params, t):
    """The table of docs/math.md, written out independently of the library."""
    if name == "linear":
        return 1 - t
    if name == "cosine":
        return 1 - torch.cos(math.pi / 2 * (1 - t))
    if name == "polynomial":
        return 1 - t ** params["exponent"]
    if name == "geometric":
        b = params["beta_min"] ** (1 - t) * params["beta_max"] ** t
        return torch.exp(-b)
    raise AssertionError(name)


@pytest.mark.parametrize("name,params", SCALAR_SPECS, ids=IDS)
def test_alpha_matches_table_and_clipping(name, params):
    sched = maskdiff.get_schedule(name, eps=EPS, **params)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    expected = (1 - 2 * EPS) * closed_form_alpha_tilde(name, params, t) + EPS
    torch.testing.assert_close(sched.alpha(t), expected, rtol=0, atol=1e-12)
    if name != "geometric":  # geometric: α̃(0) = exp(-β_min) is not exactly 1
        assert sched.alpha(torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(1 - EPS, abs=1e-15)
    assert sched.alpha(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(EPS, abs=1e-8)


@pytest.mark.parametrize("name,params", SCALAR_SPECS, ids=IDS)
def test_alpha_prime_equals_autograd(name, params):
    sched = maskdiff.get_schedule(name, eps=EPS, **params)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sched.alpha(t).sum(), t)
    torch.testing.assert_close(sched.alpha_prime(t.detach()), grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,params", SCALAR_SPECS, ids=IDS)
def test_weights_finite_positive_and_match_definition(name, params):
    sched = maskdiff.get_schedule(name, eps=EPS, **params)
    t = torch.linspace(1e-6, 1 - 1e-6, 1001, dtype=torch.float64)
    w = sched.weight(t)
    assert torch.isfinite(w).all() and (w > 0).all()
    torch.testing.assert_close(w, -sched.alpha_prime(t) / (1 - sched.alpha(t)))
    assert (sched.alpha(t[1:]) < sched.alpha(t[:-1])).all(), "α must decrease"


def test_weight_closed_forms_without_clipping():
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    torch.testing.assert_close(maskdiff.get_schedule("linear", eps=0).weight(t), 1 / t)
    torch.testing.assert_close(maskdiff.get_schedule("polynomial", exponent=3.0, eps=0).weight(t), 3 / t)
    torch.testing.assert_close(
        maskdiff.get_schedule("cosine", eps=0).weight(t), math.pi / 2 * torch.tan(math.pi / 2 * (1 - t))
    )


def test_genmd4_schedule_formulas_and_autograd():
    V = 5
    sched = maskdiff.get_schedule("genmd4", vocab_size=V, init_exponent=1.5, eps=EPS)
    assert isinstance(sched, torch.nn.Module) and sched.per_token
    torch.testing.assert_close(sched.exponents, torch.full((V,), 1.5))
    with torch.no_grad():
        sched.phi.copy_(torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0]))
    w = torch.nn.functional.softplus(sched.phi.detach()).double()
    tokens = torch.arange(V).expand(7, V)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    tt = t[:, None]
    torch.testing.assert_close(sched.alpha(t, tokens).double(), 1 - (1 - EPS) * tt**w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sched.weight(t, tokens).double(), w / tt, rtol=1e-5, atol=1e-6)
    # α' against autograd in t.
    tg = t.float().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sched.alpha(tg, tokens).sum(), tg)
    torch.testing.assert_close(sched.alpha_prime(t.float(), tokens).sum(1), grad, rtol=1e-4, atol=1e-5)
    assert sched.alpha(torch.zeros(1), tokens[:1]).eq(1).all()  # α_0 = 1 exactly
    torch.testing.assert_close(sched.alpha(torch.ones(1), tokens[:1]), torch.full((1, V), EPS))


def test_scalar_schedule_broadcasts_over_tokens_like_per_token_one():
    sched = maskdiff.get_schedule("linear")
    x = torch.randint(0, 4, (3, 6))
    t = torch.tensor([0.1, 0.5, 0.9])
    a = sched.alpha(t, x)
    assert a.shape == x.shape
    torch.testing.assert_close(a, sched.alpha(t)[:, None].expand(3, 6))
    with pytest.raises(ValueError, match="does not broadcast"):
        sched.alpha(torch.rand(4), x)


def test_get_schedule_errors_are_clear():
    with pytest.raises(ValueError, match="unknown schedule 'sqrt'.*linear"):
        maskdiff.get_schedule("sqrt")
    with pytest.raises(TypeError, match="bad parameters for schedule 'linear'"):
        maskdiff.get_schedule("linear", exponent=2)
    with pytest.raises(ValueError, match="exponent > 0"):
        maskdiff.get_schedule("polynomial", exponent=0)
    with pytest.raises(ValueError, match="mask id has no schedule"):
        maskdiff.get_schedule("genmd4", vocab_size=3).alpha(torch.rand(1), torch.tensor([[3]]))
    assert isinstance(maskdiff.get_schedule("LINEAR"), ScalarSchedule)


@pytest.mark.parametrize("name,params", SCALAR_SPECS[:3], ids=IDS[:3])
@pytest.mark.parametrize("t_value", [0.1, 0.5, 0.9])
def test_empirical_mask_rate_matches_one_minus_alpha(name, params, t_value):
    sched = maskdiff.get_schedule(name, **params)
    g = torch.Generator().manual_seed(1234)
    B, L, V = 64, 2048, 7
    x = torch.randint(0, V, (B, L), generator=g)
    z = forward_sample(x, torch.full((B,), t_value), sched, mask_id=V, generator=g)
    p = 1 - sched.alpha(torch.tensor(t_value, dtype=torch.float64)).item()
    rate = (z == V).double().mean().item()
    se = math.sqrt(p * (1 - p) / (B * L))
    assert abs(rate - p) < 4 * se, (rate, p, se)
    assert torch.equal(z[z != V], x[z != V]), "unmasked tokens must be copied unchanged"


def test_empirical_mask_rate_per_token_schedule():
    V = 4
    sched = GenMD4Schedule(V, eps=EPS)
    with torch.no_grad():
        sched.phi.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    g = torch.Generator().manual_seed(7)
    B, L, t = 64, 4096, 0.4
    x = torch.randint(0, V, (B, L), generator=g)
    z = forward_sample(x, torch.full((B,), t), sched, mask_id=V, generator=g)
    for j in range(V):
        sel = x == j
        p = (1 - EPS) * t ** sched.exponents[j].item()
        rate = (z[sel] == V).double().mean().item()
        se = math.sqrt(p * (1 - p) / sel.sum().item())
        assert abs(rate - p) < 4 * se, (j, rate, p)


def test_time_sampling_antithetic_and_iid():
    g = torch.Generator().manual_seed(0)
    t = sample_times(8, antithetic=True, generator=g, dtype=torch.float64)
    gaps = torch.sort(t).values.diff()
    torch.testing.assert_close(gaps, torch.full((7,), 1 / 8, dtype=torch.float64))
    assert ((t >= 0) & (t < 1)).all()
    iid = sample_times(100_000, antithetic=False, generator=g, dtype=torch.float64)
    assert abs(iid.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / 100_000)
    # The same seed gives the same times.
    a = sample_times(5, generator=torch.Generator().manual_seed(3))
    b = sample_times(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_discretize_and_rescale_time():
    u = torch.tensor([0.0, 0.2499, 0.25, 0.999], dtype=torch.float64)
    t, s = discretize_time(u, 4)
    torch.testing.assert_close(t, torch.tensor([0.25, 0.25, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s, t - 0.25)
    torch.testing.assert_close(rescale_time(torch.tensor([0.0, 1.0]), 1e-3), torch.tensor([1e-3, 1.0]))
