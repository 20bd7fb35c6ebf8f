"""Numerical defects found by the review of the math (issue 13), each with a test that fails on the
old code (shown by a "power" check that runs the old formula where it no longer exists in the
library): docs/math.md, "Numerics".

Statistical checks use fixed seeds and tolerances in standard errors (SE); a power check shows
that the wrong variant is rejected by a wide margin.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import maskdiff
import maskdiff.sampling.categorical as categorical
import maskdiff.sampling.sampler as sampler_module
from maskdiff.cross_entropy import linear_genmd4_terms
from maskdiff.losses import (
    genmd4_diffusion_integrand,
    genmd4_log_mask_probability,
    genmd4_losses,
    genmd4_position_terms,
    md4_loss_terms,
    md4_nelbo,
)
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import Transformer, TransformerConfig
from maskdiff.sampling import ancestral_step, mean_step, sample, time_grid, unmask_probability, vocab_alpha
from maskdiff.schedules import GenMD4Schedule


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def genmd4_schedule(vocab: int, seed: int = 0, eps: float = 1e-4, spread: float = 1.0) -> GenMD4Schedule:
    """A GenMD4 schedule with exponents spread around 1 (not the all-equal initial state)."""
    sched = GenMD4Schedule(vocab, eps=eps)
    with torch.no_grad():
        sched.phi.add_(spread * torch.randn(vocab, generator=gen(seed)))
    return sched


# ---------------------------------------------------------------------------------------------
# 1. MD4's objective refuses a per-token schedule


def test_md4_objective_refuses_a_per_token_schedule():
    sched = genmd4_schedule(5)
    x = torch.randint(0, 5, (2, 6), generator=gen(0))
    uniform = lambda z, t: torch.zeros(*z.shape, 5)  # noqa: E731
    for fn in (md4_nelbo, md4_loss_terms):
        with pytest.raises(ValueError, match="genmd4_losses"):
            fn(uniform, x, sched)
    net = Transformer(TransformerConfig(vocab_size=5, seq_len=6, n_layers=1, d_model=16, n_heads=2))
    with pytest.raises(ValueError, match="method 'genmd4'"):
        MaskedDiffusion(net, sched, "md4")
    # Scalar schedules are unaffected.
    assert md4_nelbo(uniform, x, maskdiff.get_schedule("linear"), generator=gen(1)).shape == (2,)


# ---------------------------------------------------------------------------------------------
# 2. GenMD4's Σ_j w_j μ_j in float32 under bf16 autocast


def old_genmd4_integrand(logits, x, masked, t, w):
    """The 0.1 code: ``exp(log μ) @ w`` as written, i.e. in bf16 under autocast (power check)."""
    log_mu = F.log_softmax(logits[masked].float(), dim=-1)
    target = x[masked]
    rows = masked.nonzero(as_tuple=True)[0]
    log_mu_x = log_mu.gather(-1, target[:, None]).squeeze(-1)
    per = (1.0 / t[rows]) * (w[target] * (-log_mu_x - 1.0) + log_mu.exp() @ w)
    return torch.zeros(x.shape[0]).index_add(0, rows, per)


def reference_genmd4_integrand(logits, x, masked, t, w):
    """Float64, written out: Σ_masked (w_x/t)(-log μ_x - 1) + Σ_j (w_j/t) μ_j."""
    log_mu = torch.log_softmax(logits.double(), -1)
    w = w.double()
    log_mu_x = log_mu.gather(-1, x[..., None]).squeeze(-1)
    per = (w[x] * (-log_mu_x - 1.0) + log_mu.exp() @ w) / t.double()[:, None]
    return (per * masked).sum(1)


def test_genmd4_expected_exponent_is_float32_under_bf16_autocast():
    vocab, batch, length = 512, 4, 128
    sched = genmd4_schedule(vocab, seed=1, spread=2.0)
    w = sched.exponents.detach().float()
    logits = 3.0 * torch.randn(batch, length, vocab, generator=gen(2))
    x = torch.randint(0, vocab, (batch, length), generator=gen(3))
    masked = torch.ones(batch, length, dtype=torch.bool)
    t = torch.tensor([0.01, 0.1, 0.5, 0.9])
    exact = reference_genmd4_integrand(logits, x, masked, t, w)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        new = genmd4_diffusion_integrand(logits, x, masked, t, sched).double()
        old = old_genmd4_integrand(logits, x, masked, t, w).double()
    rel_new = (new - exact).abs() / exact.abs()
    rel_old = (old - exact).abs() / exact.abs()
    # Float32 rounding of a sum of 128 positions: a few 1e-7 relative. The bf16 product carried
    # 2-5e-5 relative per sequence (4.1 nats of 163,170 at t = 0.01 here).
    assert bool((rel_new < 1e-6).all()), rel_new
    assert bool((rel_old > 1e-5).all()), rel_old  # power: the old bf16 product fails this test


def test_chunked_genmd4_terms_under_bf16_autocast_keep_float32_after_the_head():
    """The chunked path's head matmul is bf16 under autocast (as MD4's); everything after it is
    float32: against float64 arithmetic on the same bf16 logits, only float32 rounding remains."""
    vocab, n, dim = 300, 64, 16
    h = torch.randn(n, dim, generator=gen(4))
    head = torch.randn(vocab, dim, generator=gen(5)) / 2
    y = torch.randint(0, vocab, (n,), generator=gen(6))
    w = genmd4_schedule(vocab, seed=7, spread=2.0).exponents.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_genmd4_terms(h, head, y, w, chunk_size=16).double()
    logits = (h.bfloat16() @ head.bfloat16().T).double()
    log_mu = torch.log_softmax(logits, -1)
    expected = w.double()[y] * (-log_mu[torch.arange(n), y] - 1.0) + log_mu.exp() @ w.double()
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# 3. ε = 0: t rounding to 1 in float32


def old_log_mask_probability(z, x, t, sched):
    """The 0.1 code: log1p(-exp(·)) evaluated at every position (power check)."""
    log_masked = sched.log_alpha_complement(t, x)
    return torch.where(z == sched.vocab_size, log_masked, torch.log1p(-torch.exp(log_masked))).sum(1)


def test_genmd4_log_q_at_t_one_with_eps_zero_has_finite_gradients():
    vocab = 6
    sched = genmd4_schedule(vocab, seed=8, eps=0.0)
    x = torch.randint(0, vocab, (3, 10), generator=gen(9))
    z = torch.full_like(x, vocab)  # at t = 1 with ε = 0 every token is masked
    t = torch.ones(3)
    (grad,) = torch.autograd.grad(genmd4_log_mask_probability(z, x, t, sched).sum(), sched.phi)
    assert torch.isfinite(grad).all()
    (old_grad,) = torch.autograd.grad(old_log_mask_probability(z, x, t, sched).sum(), sched.phi)
    assert torch.isnan(old_grad).any()  # power: the old form's unselected -inf made the gradient NaN


def test_genmd4_log_q_of_a_visible_token_near_t_one_is_accurate():
    """log(1 - t^w) at t = 1 - 2^-24, ε = 0: the old log1p(-exp(·)) rounded t^w to 1 and gave -inf."""
    sched = GenMD4Schedule(2, init_exponent=0.3, eps=0.0)
    x = torch.tensor([[0, 1]])
    z = x.clone()  # both visible
    t = torch.tensor([1.0 - 2.0**-24])
    w = sched.exponents.detach().double()
    exact = float(torch.log(-torch.expm1(w[x[0]] * math.log(1.0 - 2.0**-24))).sum())
    got = float(genmd4_log_mask_probability(z, x, t, sched).detach())
    assert got == pytest.approx(exact, rel=1e-5)
    assert old_log_mask_probability(z, x, t, sched).detach().item() == -math.inf


def test_genmd4_losses_with_eps_zero_and_u_near_one_stay_finite(monkeypatch):
    vocab = 7
    sched = genmd4_schedule(vocab, seed=10, eps=0.0)
    u = 1.0 - 1e-9
    assert float(torch.tensor(1e-3 + (1 - 1e-3) * u, dtype=torch.float64).float()) == 1.0  # would round to 1
    monkeypatch.setattr(maskdiff.losses, "sample_times", lambda b, **kw: torch.full((b,), u, dtype=torch.float64))
    emb = torch.nn.Embedding(vocab + 1, vocab)
    x = torch.randint(0, vocab, (4, 12), generator=gen(11))
    terms = genmd4_losses(lambda z, t: emb(z), x, sched, generator=gen(12))
    assert bool((terms["t"] < 1.0).all())
    for key in ("surrogate", "nelbo", "diffusion"):
        assert torch.isfinite(terms[key]).all(), key
    terms["surrogate"].sum().backward()
    assert torch.isfinite(sched.phi.grad).all() and torch.isfinite(emb.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# 4. The public steps refuse NaN / +inf / all -inf logits


def bad_logits(kind: str, vocab: int = 5) -> torch.Tensor:
    lg = torch.zeros(2, 3, vocab)
    if kind == "nan":
        lg[1, 2, 0] = math.nan
    elif kind == "+inf":
        lg[1, 2, 0] = math.inf
    else:
        lg[1, 2] = -math.inf
    return lg


@pytest.mark.parametrize("kind, message", [("nan", "NaN"), ("+inf", r"\+inf"), ("-inf", "-inf for every token")])
@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("step", [ancestral_step, mean_step])
def test_steps_refuse_logits_without_a_drawable_token(kind, message, precision, step):
    z = torch.full((2, 3), 5)
    with pytest.raises(ValueError, match=message):
        step(z, bad_logits(kind), 0.0, 1.0, generator=gen(0), precision=precision)
    # A bad row at a position that is not masked is never used: no error.
    z[1, 2] = 0
    out = step(z, bad_logits(kind), 0.0, 1.0, generator=gen(0), precision=precision)
    assert bool((out < 5).all())


def test_per_token_step_refuses_nan_logits():
    sched = genmd4_schedule(5, seed=13)
    a_t, a_s = vocab_alpha(sched, torch.tensor([1.0]), 5), vocab_alpha(sched, torch.tensor([0.0]), 5)
    for precision in ("float64", "float32"):
        with pytest.raises(ValueError, match="NaN"):
            ancestral_step(torch.full((2, 3), 5), bad_logits("nan"), a_t, a_s, generator=gen(1), precision=precision)


# ---------------------------------------------------------------------------------------------
# 5. Memory: chunked GenMD4 loss, chunked draws, streamed per-token α (same values)


def small_model(chunked: bool, *, tie: bool = False, classes: int = 0, time: bool = True) -> MaskedDiffusion:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=13, seq_len=16, n_layers=1, d_model=32, n_heads=4,
                            time_conditioning=time, tie_embeddings=tie, num_classes=classes)
    net = Transformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return MaskedDiffusion(net, genmd4_schedule(13, seed=14), "genmd4", chunked_loss=chunked)


@pytest.mark.parametrize("variant", [dict(), dict(tie=True), dict(classes=3, time=False), dict(score=True)])
def test_chunked_genmd4_loss_equals_full_logits(variant):
    """Same seed, same draws: the chunked head path gives the full-logits terms and gradients
    (network, head and the schedule's φ)."""
    variant = dict(variant)
    x = torch.randint(0, 13, (6, 16), generator=gen(2))
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if variant.get("classes") else None
    score = (torch.rand(6, 16, generator=gen(4)) < 0.7) if variant.pop("score", False) else None
    results = []
    for chunked in (False, True):
        model = small_model(chunked, **variant).train()
        terms = model(x, generator=gen(3), labels=labels, score_mask=score)
        terms["loss"].backward()
        results.append((terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (fast, fast_grads) = results
    for key in ("diffusion", "nelbo", "surrogate", "num_masked"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == fast_grads.keys() and "schedule.phi" in ref_grads
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_linear_genmd4_terms_match_the_formula_in_values_and_gradients(chunk_size):
    vocab, n, dim = 11, 10, 6
    h = torch.randn(n, dim, generator=gen(5), dtype=torch.float64, requires_grad=True)
    head = torch.randn(vocab, dim, generator=gen(6), dtype=torch.float64, requires_grad=True)
    w = (0.5 + torch.rand(vocab, generator=gen(7), dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=gen(8))
    upstream = torch.rand(n, generator=gen(9), dtype=torch.float64)  # a non-uniform incoming gradient
    grads = []
    for fn in (lambda: genmd4_position_terms(torch.log_softmax(h @ head.T, -1), y, w),  # float64 reference
               lambda: linear_genmd4_terms(h, head, y, w, chunk_size=chunk_size)):
        out = fn()
        grads.append((out.double(), *torch.autograd.grad((out.double() * upstream).sum(), (h, head, w))))
    assert grads[1][0].dtype == torch.float64 and linear_genmd4_terms(h, head, y, w).dtype == torch.float32
    for ref, got in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # float32 internals
    assert torch.autograd.gradcheck(lambda a, b, c: linear_genmd4_terms(a, b, y, c, chunk_size=chunk_size).double(),
                                    (h, head, w), eps=1e-3, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="exponents must have shape"):
        linear_genmd4_terms(h, head, y, w[:-1])


def test_chunked_genmd4_with_nothing_masked_keeps_the_graph():
    model = small_model(True)
    x = torch.randint(0, 13, (2, 16), generator=gen(9))
    out = model._chunked_genmd4_terms(None)(x, torch.full((2,), 0.5), x, torch.zeros_like(x, dtype=torch.bool),
                                           model.schedule.exponents)
    assert torch.equal(out, torch.zeros(2, 16))
    out.sum().backward()
    assert model.network.head.weight.grad is not None


STEP_CASES = [("ancestral", "float64", False), ("ancestral", "float64", True), ("ancestral", "float32", False),
              ("ancestral", "float32", True), ("mean", "float64", False), ("mean", "float32", False)]


@pytest.mark.parametrize("kind, precision, per_token", STEP_CASES)
def test_chunked_draws_equal_one_chunk(monkeypatch, kind, precision, per_token):
    """Rows in chunks of 3: the same tokens as all rows at once (CPU draws are sequential)."""
    vocab, b, length = 9, 4, 25
    logits = torch.randn(b, length, vocab, generator=gen(10))
    z = torch.where(torch.rand(b, length, generator=gen(11)) < 0.8, vocab, 0)
    if per_token:
        sched = genmd4_schedule(vocab, seed=12)
        a_t, a_s = (vocab_alpha(sched, torch.tensor([t]), vocab) for t in (0.8, 0.3))
    else:
        a_t, a_s = torch.tensor([[0.2]], dtype=torch.float64), torch.tensor([[0.7]], dtype=torch.float64)
    step = ancestral_step if kind == "ancestral" else mean_step

    def run():
        return step(z, logits, a_t, a_s, generator=gen(13), precision=precision, top_p=0.9, temperature=0.8)

    whole = run()
    monkeypatch.setattr(categorical, "DRAW_CHUNK_ELEMENTS", 3 * (vocab + 1))
    assert len(categorical._row_chunks(b * length, vocab + 1)) > 10
    assert torch.equal(run(), whole)
    assert (whole < vocab).any() and (whole == vocab).any()


def test_streamed_per_token_alpha_equals_the_table(monkeypatch):
    """α in blocks of 4 grid times (the sampler's streamed form at large V): the values of the
    whole-grid table up to float64 rounding, never more than two blocks held, and the same samples."""
    vocab = 23
    sched = sampler_module._prepare_schedule(genmd4_schedule(vocab, seed=15), torch.float64, torch.device("cpu"))
    times = time_grid(40, "cosine")
    table = vocab_alpha(sched, times, vocab)
    monkeypatch.setattr(sampler_module, "ALPHA_BLOCK_ELEMENTS", 4 * vocab)
    streamed = sampler_module._GridAlphas(sched, times, vocab)
    assert streamed.rows == 4
    for i in range(len(times)):
        torch.testing.assert_close(streamed[i], table[i : i + 1], rtol=1e-14, atol=0)  # float64 rounding
        assert len(streamed.blocks) <= 2
    den = lambda z, t: torch.randn(*z.shape, vocab, generator=gen(int(1e6 * float(t[0]))))  # noqa: E731

    def draw():
        return sample(den, sched, batch_size=3, length=12, vocab_size=vocab, num_steps=40, generator=gen(16))

    streamed_tokens = draw()
    monkeypatch.setattr(sampler_module, "PER_TOKEN_ALPHA_TABLE", True)
    assert sampler_module._GridAlphas(sched, times, vocab).rows == len(times)
    assert torch.equal(draw(), streamed_tokens)


# ---------------------------------------------------------------------------------------------
# 6. The float32 sampler forms r in float64


def worst_float32_step():
    """Geometric schedule with ε = 0, uniform 1,000-step grid, step 992: α near 1, where float32
    rounding of α moves r = (α_s - α_t)/(1 - α_t) by a quarter."""
    sched = maskdiff.get_schedule("geometric", eps=0.0)
    alphas = vocab_alpha(sched, time_grid(1000, "uniform"), 2)
    return sched, alphas[992:993], alphas[993:994]


@pytest.mark.parametrize("step", [ancestral_step, mean_step])
def test_float32_step_unmasks_with_the_float64_rate(step):
    _, a_t, a_s = worst_float32_step()
    r64 = float(unmask_probability(a_t, a_s))
    r32 = float(unmask_probability(a_t.float(), a_s.float()))
    assert abs(r32 - r64) > 0.2 * r64  # the error this guards against
    n = 200_000
    z = torch.full((1000, n // 1000), 2)
    out = step(z, torch.zeros(*z.shape, 2), a_t, a_s, generator=gen(17), precision="float32")
    k = int((out < 2).sum())
    se = math.sqrt(n * r64 * (1 - r64))
    assert abs(k - n * r64) < 4 * se, (k, n * r64, se)
    assert abs(k - n * r32) > 8 * se, (k, n * r32, se)  # power: the old rate is rejected


def test_sample_passes_float64_alpha_to_the_float32_step(monkeypatch):
    seen = []
    real = sampler_module.ancestral_step

    def spy(z, logits, alpha_t, alpha_s, **kw):
        seen.append((alpha_t.dtype, alpha_s.dtype, kw["precision"]))
        return real(z, logits, alpha_t, alpha_s, **kw)

    monkeypatch.setattr(sampler_module, "ancestral_step", spy)
    sched, _, _ = worst_float32_step()
    sample(lambda z, t: torch.zeros(*z.shape, 2), sched, batch_size=2, length=4, vocab_size=2, num_steps=5,
           generator=gen(18), precision="float32")
    assert seen and all(s == (torch.float64, torch.float64, "float32") for s in seen)


# ---------------------------------------------------------------------------------------------
# 8. Documented behaviour: top-p ties at the cut-off (docs/math.md, "Temperature, top-k and top-p")


def test_top_p_splits_tied_tokens_at_the_cut_off_by_id():
    from maskdiff.sampling import transform_logits

    def kept(probs, p):
        lg = torch.log(torch.tensor([probs], dtype=torch.float64))
        return torch.isfinite(transform_logits(lg, top_p=p))[0].nonzero().flatten().tolist()

    assert kept([0.4, 0.3, 0.3], 0.6) == [0, 1]  # token 2 ties with token 1 but is dropped
    assert kept([0.3, 0.3, 0.4], 0.6) == [0, 2]  # the lower id of the tied pair is kept
    assert kept([0.2] * 5, 0.5) == [0, 1, 2]
