"""Approximate samplers (ordered, threshold, entropy-bounded, ReMDM, blocks): they behave as documented.

Every check uses fixed seeds and a small deterministic denoiser that counts its calls. The
ordering scores are checked on hand-made distributions in which confidence, margin and entropy
each pick a different position, so a swapped or sign-flipped score fails.
"""

import math

import pytest
import torch

from maskdiff.sampling import make_fixed, sample
from maskdiff.sampling.blocks import block_grid, block_steps, sample_long, window_spans
from maskdiff.sampling.ordered import (
    entropy_bounded_step,
    ordered_step,
    position_scores,
    select_best,
    threshold_step,
    time_at_alpha,
    time_for_masked_fraction,
    unmask_counts,
)
from maskdiff.sampling.registry import get_sampler, sampler_class
from maskdiff.sampling.remdm import loop_path, remdm_sigma, remdm_step
from maskdiff.sampling.steps import ancestral_step, time_grid
from maskdiff.schedules import get_schedule

V = 5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CountingDenoiser:
    """A fixed random function of (z, t) → logits (B, L, V) that counts calls and rows.

    The logits of position i depend on the whole of z (a random embedding summed over the
    sequence) and on t, so a sampler that calls it at another state or time gets other logits.
    """

    def __init__(self, vocab_size: int = V, length: int = 12, seed: int = 0, time_conditioning: bool = True):
        g = gen(seed)
        self.vocab_size, self.length = vocab_size, length
        self.emb = torch.randn(vocab_size + 1, length, vocab_size, generator=g)
        self.pos = 2.0 * torch.randn(length, vocab_size, generator=g)
        self.time_conditioning = time_conditioning
        self.calls = 0
        self.rows = 0
        self.seen: list[torch.Tensor] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += z.shape[0]
        self.seen.append(z.clone())
        l = z.shape[1]
        ctx = self.emb[z, torch.arange(l)].mean(1, keepdim=True)  # (B, 1, V)
        tt = t.to(torch.float32)[:, None, None] if self.time_conditioning else 0.0
        return self.pos[None, :l] + ctx + tt


# --------------------------------------------------------------------------------------------
# Scores and counts on hand-made inputs
# --------------------------------------------------------------------------------------------

#: Three distributions where each score picks another position:
#: A: conf .50, margin .02, entropy .78 (lowest)  → entropy's pick
#: B: conf .63 (highest), margin .34, entropy .88 → confidence's pick
#: C: conf .58, margin .43 (highest), entropy 1.14 → margin's pick
HAND = torch.tensor([[0.50, 0.48, 0.02, 1e-12], [0.63, 0.29, 0.07, 0.01], [0.58, 0.12, 0.15, 0.15]],
                    dtype=torch.float64)


def test_scores_on_hand_made_distributions():
    logits = HAND.log()
    conf, ent = position_scores(logits, "confidence")
    assert torch.allclose(conf, HAND.amax(-1))
    assert torch.allclose(ent, torch.tensor([0.7771, 0.8823, 1.1395], dtype=torch.float64), atol=1e-4)
    margin, _ = position_scores(logits, "margin")
    assert torch.allclose(margin, torch.tensor([0.02, 0.34, 0.43], dtype=torch.float64))
    neg_h, _ = position_scores(logits, "entropy")
    assert torch.allclose(neg_h, -ent)
    with pytest.raises(ValueError, match="score must be one of"):
        position_scores(logits, "random")


@pytest.mark.parametrize("score,first,second", [("confidence", 1, 2), ("margin", 2, 1), ("entropy", 0, 1)])
def test_ordered_step_unmasks_the_best_scored_positions(score, first, second):
    # positions 0..2 masked with the hand-made μ, position 3 fixed (unmasked) with a confident μ
    v = 4
    z = torch.tensor([[v, v, v, 0]])
    logits = torch.cat([HAND.log(), torch.tensor([[0.0, -9.0, -9.0, -9.0]], dtype=torch.float64)])[None]
    one = ordered_step(z, logits.float(), torch.tensor([1]), score=score, generator=gen(0))
    assert (one != v).sum() == 2 and one[0, first] != v and one[0, 3] == 0
    two = ordered_step(z, logits.float(), torch.tensor([2]), score=score, generator=gen(0))
    assert set((two[0, :3] != v).nonzero().flatten().tolist()) == {first, second}
    # the tokens come from μ: position 1 of HAND never draws its 1e-12 token... and greedy picks the argmax
    greedy = ordered_step(z, logits.float(), torch.tensor([3]), score=score, temperature=0.0, generator=gen(0))
    assert greedy[0, :3].tolist() == HAND.argmax(-1).tolist()


def test_select_best_per_row_counts_and_ties():
    s = torch.tensor([[0.1, 0.5, 0.5, -math.inf], [0.3, -math.inf, 0.2, 0.9]], dtype=torch.float64)
    sel = select_best(s, torch.tensor([2, 5]))
    assert sel.tolist() == [[False, True, True, False], [True, False, True, True]]
    assert select_best(s, torch.tensor([1, 0])).tolist() == [[False, True, False, False], [False] * 4]


def test_unmask_counts_follow_the_schedule_and_finish():
    sched = get_schedule("linear")
    for grid, steps in (("cosine", 7), ("uniform", 16), ("uniform", 40)):
        times = time_grid(steps, grid)
        free = torch.tensor([0, 1, 16, 33])
        k = unmask_counts(sched.alpha(times), free)
        assert k.shape == (steps, 4) and (k >= 0).all()
        assert k.sum(0).tolist() == free.tolist()  # every mask gone after T steps
        # cumulative count = the schedule's expected count, rounded half up (except the last step)
        frac = (1 - sched.alpha(times)) / (1 - sched.alpha(times[:1]))
        want = torch.floor(free[None] * (1 - frac[1:-1, None]) + 0.5)
        assert torch.equal(k.cumsum(0)[:-1].double(), want)
    # uniform grid, linear schedule: LLaDA's equal split
    equal = unmask_counts(get_schedule("linear", eps=0.0).alpha(time_grid(4, "uniform")), torch.tensor([8]))
    assert equal.flatten().tolist() == [2] * 4


def test_time_inversion():
    for name in ("linear", "cosine", "geometric"):
        sched = get_schedule(name)
        t = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0], dtype=torch.float64)
        assert torch.allclose(time_at_alpha(sched, sched.alpha(t)), t, atol=1e-9)
        f = (1 - sched.alpha(t)) / (1 - sched.alpha(torch.ones(1, dtype=torch.float64)))
        assert torch.allclose(time_for_masked_fraction(sched, f), t, atol=1e-9)
    with pytest.raises(ValueError, match="scalar schedule"):
        time_at_alpha(get_schedule("genmd4", vocab_size=3), torch.tensor([0.5]))


def test_threshold_step_takes_every_confident_position_and_at_least_one():
    v = 4
    z = torch.full((1, 3), v)
    logits = HAND.log()[None].float()
    out = threshold_step(z, logits, 0.55, generator=gen(0))
    assert (out[0] != v).tolist() == [False, True, True]  # conf .50 < .55 ≤ .58, .63
    out = threshold_step(z, logits, 1.5, generator=gen(0))
    assert (out[0] != v).tolist() == [False, True, False]  # τ > 1: the most confident alone
    assert (threshold_step(z, logits, 0.0, generator=gen(0)) != v).all()


def test_entropy_bounded_step_rule():
    v = 4
    z = torch.full((1, 3), v)
    logits = HAND.log()[None].float()
    h = sorted((-(HAND * HAND.log())).sum(-1).tolist())  # .777, .882, 1.14
    cases = [(0.0, 1), (h[0] - 1e-6, 1), (h[0] + 1e-6, 2), (h[0] + h[1] - 1e-6, 2), (h[0] + h[1] + 1e-6, 3)]
    for gamma, n in cases:
        out = entropy_bounded_step(z, logits, gamma, generator=gen(0))
        assert int((out != v).sum()) == n, gamma
        assert out[0, 0] != v  # entropy order: A (lowest entropy) first
    out = entropy_bounded_step(z, logits, 0.0, score="confidence", generator=gen(0))
    assert (out[0] != v).tolist() == [False, True, False]


# --------------------------------------------------------------------------------------------
# ReMDM steps
# --------------------------------------------------------------------------------------------


def test_remdm_sigma_strategies():
    assert remdm_sigma("cap", 0.05, 0.5, 0.6) == 0.05
    assert remdm_sigma("cap", 0.9, 0.5, 0.6) == pytest.approx(0.8)  # σ_max = (1 − .6)/.5
    assert remdm_sigma("rescale", 0.5, 0.5, 0.6) == pytest.approx(0.4)
    assert remdm_sigma("rescale", 0.5, 0.2, 0.3) == pytest.approx(0.5)  # σ_max capped at 1
    assert remdm_sigma("cap", 0.0, 0.5, 0.6) == 0.0
    with pytest.raises(ValueError, match="rescale"):
        remdm_sigma("rescale", 1.5, 0.5, 0.6)


def test_remdm_step_with_sigma_zero_is_the_ancestral_step():
    den = CountingDenoiser()
    z = torch.randint(0, V + 1, (6, 12), generator=gen(3))
    logits = den(z, torch.full((6,), 0.6))
    for prec in ("float64", "float32"):
        a = ancestral_step(z, logits, 0.4, 0.55, generator=gen(5), precision=prec)
        b = remdm_step(z, logits, 0.4, 0.55, 0.0, generator=gen(5), precision=prec)
        assert torch.equal(a, b)


def test_remdm_step_law():
    """Per position: unmasked → masked with σ; masked → unmasked with (α_s − (1 − σ) α_t)/(1 − α_t)."""
    n, at, as_, sigma = 40_000, 0.4, 0.6, 0.3
    z = torch.tensor([[V, 2]]).expand(n, 2).contiguous()
    logits = torch.zeros(n, 2, V)
    remaskable = torch.tensor([[True, True]])
    out = remdm_step(z, logits, at, as_, sigma, remaskable=remaskable, generator=gen(1))
    p_unmask = (as_ - (1 - sigma) * at) / (1 - at)
    for got, p in (((out[:, 0] != V).double().mean(), p_unmask), ((out[:, 1] == V).double().mean(), sigma)):
        se = math.sqrt(p * (1 - p) / n)
        assert abs(float(got) - p) < 4 * se
    assert ((out[:, 1] == 2) | (out[:, 1] == V)).all()
    fixed = remdm_step(z, logits, at, as_, sigma, remaskable=torch.tensor([[True, False]]), generator=gen(1))
    assert (fixed[:, 1] == 2).all()
    with pytest.raises(ValueError, match="sigma must lie"):
        remdm_step(z, logits, 0.5, 0.6, 0.81)  # σ_max = (1 − 0.6)/0.5 = 0.8


def test_loop_path():
    sched = get_schedule("linear")
    clock = time_grid(20, "uniform")
    alpha, times, sig = loop_path(sched, clock, eta=0.02, t_on=0.55, t_off=0.05, alpha_on=0.9)
    assert float(alpha[0]) == pytest.approx(float(sched.alpha(torch.ones(1))[0]))
    assert float(alpha[-1]) == pytest.approx(float(sched.alpha(torch.zeros(1))[0]))
    assert (alpha[1:] >= alpha[:-1] - 1e-15).all()
    plateau = (clock > 0.05) & (clock <= 0.55)
    assert torch.allclose(alpha[plateau], torch.full_like(alpha[plateau], 0.9))
    assert torch.allclose(sched.alpha(times), alpha, atol=1e-12)
    assert (sig[plateau[:-1]] == 0.02).all() and (sig[~plateau[:-1]] == 0).all()
    with pytest.raises(ValueError, match="t_off < t_on"):
        loop_path(sched, clock, eta=0.02, t_on=0.05, t_off=0.5)


# --------------------------------------------------------------------------------------------
# The samplers through maskdiff.sample
# --------------------------------------------------------------------------------------------

SCHED = get_schedule("linear")
L = 12
#: (name, options) of every approximate sampler, with knobs that make them do something.
APPROX = [
    ("confidence", {}),
    ("margin", {}),
    ("entropy", {}),
    ("threshold", {"threshold": 0.5}),
    ("entropy-bounded", {"gamma": 1.0}),
    ("entropy-bounded", {"gamma": 1.0, "score": "confidence"}),
    ("remdm", {"eta": 0.2}),
    ("remdm", {"strategy": "rescale", "eta": 0.5}),
    ("remdm", {"strategy": "loop", "eta": 0.2}),
    ("confidence", {"block_length": 5}),
    ("ancestral", {"block_length": 4}),
    ("threshold", {"threshold": 0.5, "block_length": 4}),
    ("remdm", {"eta": 0.2, "block_length": 6}),
]


def run(name, opts, *, seed=0, batch=4, steps=8, fixed=None, den=None, **kw):
    den = den or CountingDenoiser()
    z, info = sample(den, SCHED, batch_size=batch, length=L, vocab_size=V, num_steps=steps, generator=gen(seed),
                     fixed=fixed, return_info=True, sampler=name, **opts, **kw)
    return z, info, den


def some_fixed(batch=4):
    """A prompt of 2, a suffix of 1 and one fixed position in the middle (row 1 fixes one more)."""
    f = make_fixed(L, prefix=[1, 2], suffix=[3], positions={6: 0}).expand(batch, L).clone()
    f[1, 9] = 4
    return f


@pytest.mark.parametrize("name,opts", APPROX, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in APPROX])
def test_terminates_keeps_fixed_tokens_and_is_deterministic(name, opts):
    fixed = some_fixed()
    z, info, den = run(name, opts, fixed=fixed)
    assert z.shape == (4, L) and ((z >= 0) & (z < V)).all()  # no mask left
    keep = fixed >= 0
    assert torch.equal(z[keep], fixed[keep])
    for seen in den.seen:  # the network never saw a fixed token changed or masked
        assert torch.equal(seen[keep], fixed[keep])
    assert info.denoiser_calls == den.calls and info.denoiser_rows == den.rows
    z2, info2, _ = run(name, opts, fixed=fixed)
    assert torch.equal(z, z2) and info2.denoiser_calls == info.denoiser_calls
    z3, _, _ = run(name, opts, fixed=fixed, seed=1)
    assert not torch.equal(z, z3)
    sampler = get_sampler(name, opts)
    assert not sampler.exact and sampler.preserves and sampler.calls and info.sampler == sampler.name


@pytest.mark.parametrize("name", ["confidence", "margin", "entropy"])
@pytest.mark.parametrize("grid,steps", [("cosine", 6), ("uniform", 4), ("cosine", 20)])
def test_ordered_unmasks_the_scheduled_count_with_one_call_per_busy_step(name, grid, steps):
    fixed = some_fixed()
    z, info, den = run(name, {}, fixed=fixed, grid=grid, steps=steps)
    free = (fixed < 0).sum(1)
    counts = unmask_counts(SCHED.alpha(time_grid(steps, grid)), free)
    assert torch.equal(info.num_masked[:-1] - info.num_masked[1:], counts)  # exactly k_i per step and row
    assert info.num_masked[-1].sum() == 0 and info.leftover_masks == 0
    assert den.calls == int(counts.any(1).sum()) <= steps  # one call per step that unmasks something


@pytest.mark.parametrize("name,opts", [("threshold", {"threshold": 1.01}), ("entropy-bounded", {"gamma": 0.0})])
def test_one_token_per_call_limits(name, opts):
    fixed = some_fixed()
    z, info, den = run(name, opts, fixed=fixed)
    free = (fixed < 0).sum(1)  # 8 free positions, 7 in row 1
    assert info.num_steps == den.calls == int(free.max())
    steps = info.num_masked[:-1] - info.num_masked[1:]
    assert ((steps == 1) | ((steps == 0) & (info.num_masked[:-1] == 0))).all()  # one token per call per row
    assert info.denoiser_rows == 4 * den.calls  # the whole batch each call


def test_threshold_and_entropy_bound_trade_calls_for_parallelism():
    calls = [run("threshold", {"threshold": tau})[2].calls for tau in (1.01, 0.6, 0.3, 0.0)]
    assert calls[0] == L and calls[-1] == 1 and calls == sorted(calls, reverse=True) and len(set(calls)) > 2
    calls = [run("entropy-bounded", {"gamma": g})[2].calls for g in (0.0, 0.5, 2.0, 100.0)]
    assert calls[0] == L and calls[-1] == 1 and calls == sorted(calls, reverse=True) and len(set(calls)) > 2


def test_adaptive_samplers_show_the_network_the_expected_time():
    times = []

    class Recorder(CountingDenoiser):
        def __call__(self, z, t):
            times.append((int((z == V).sum()), float(t[0])))
            return super().__call__(z, t)

    run("threshold", {"threshold": 1.01}, batch=1, den=Recorder())
    assert [m for m, _ in times] == list(range(L, 0, -1))
    eps = SCHED.eps  # linear schedule: (1 − α(t)) / (1 − α(1)) = ((1 − 2ε) t + ε) / (1 − ε)
    for masked, t in times:
        assert t == pytest.approx((masked / L * (1 - eps) - eps) / (1 - 2 * eps), abs=1e-6)


@pytest.mark.parametrize("strategy", ["cap", "rescale"])
@pytest.mark.parametrize("kw", [{}, {"precision": "float32"}, {"temperature": 0.7, "top_p": 0.9, "grid": "uniform"},
                                {"lazy": False}])
def test_remdm_with_eta_zero_is_ancestral_bitwise(strategy, kw):
    fixed = some_fixed()
    a, ia, da = run("ancestral", {}, fixed=fixed, steps=16, **kw)
    r, ir, dr = run("remdm", {"strategy": strategy, "eta": 0.0}, fixed=fixed, steps=16, **kw)
    assert torch.equal(a, r)
    assert da.calls == dr.calls and ia.lazy_skips == ir.lazy_skips
    assert all(torch.equal(x, y) for x, y in zip(da.seen, dr.seen))
    r1, _, _ = run("remdm", {"strategy": strategy, "eta": 0.3}, fixed=fixed, steps=16, **kw)
    assert not torch.equal(a, r1)  # and a positive η does change the samples


def test_remdm_loop_with_eta_zero_is_ancestral_along_its_path():
    fixed = some_fixed()
    kw = dict(t_on=0.6, t_off=0.2, alpha_on=0.7)
    z, info, den = run("remdm", {"strategy": "loop", "eta": 0.0, **kw}, fixed=fixed, steps=10, grid="uniform")
    alpha, times, _ = loop_path(SCHED, time_grid(10, "uniform"), eta=0.0, **kw)
    g, ref = gen(0), CountingDenoiser()
    x = torch.where(fixed >= 0, fixed, torch.full_like(fixed, V))
    for i in range(10):
        x = ancestral_step(x, lambda x_=x, t_=times[i]: ref(x_, t_.expand(4)), float(alpha[i]), float(alpha[i + 1]),
                           generator=g, vocab_size=V)
    left = x == V
    if left.any():
        x = torch.where(left, ref(x, times[-1].expand(4)).argmax(-1), x)
    assert torch.equal(z, x) and den.calls == ref.calls
    assert info.lazy_skips >= 4  # the 4 loop steps at constant α change nothing and call nothing


def test_remdm_remasks_and_redraws():
    fixed = some_fixed()
    _, info, _ = run("remdm", {"eta": 0.5}, fixed=fixed, steps=32)
    assert ((info.num_masked[1:] - info.num_masked[:-1]) > 0).any()  # some step masked tokens again


def test_approximate_samplers_refuse_per_token_schedules():
    genmd4 = get_schedule("genmd4", vocab_size=V)
    for name in ("confidence", "threshold", "entropy-bounded", "remdm"):
        with pytest.raises(ValueError, match="scalar schedule"):
            sample(CountingDenoiser(), genmd4, batch_size=1, length=L, vocab_size=V, num_steps=4, sampler=name)


def test_option_checks():
    for name, opts, match in [("threshold", {"threshold": -0.1}, "threshold must be"),
                              ("entropy-bounded", {"gamma": -1.0}, "gamma must be"),
                              ("remdm", {"strategy": "rescale", "eta": 2.0}, "eta must lie"),
                              ("remdm", {"t_on": 0.1, "t_off": 0.2}, "t_off < t_on"),
                              ("confidence", {"block_length": 0}, "block_length must be")]:
        with pytest.raises(ValueError, match=match):
            run(name, opts)
    with pytest.raises(ValueError, match="num_steps ≥ the number of blocks"):
        run("ancestral", {"block_length": 2}, steps=4)


# --------------------------------------------------------------------------------------------
# Blocks and sliding windows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,opts", [("confidence", {}), ("ancestral", {}), ("threshold", {"threshold": 0.5}),
                                       ("remdm", {"eta": 0.3}), ("mean", {}), ("first-hitting", {})])
def test_blocks_never_unmask_beyond_the_current_block(name, opts):
    fixed = some_fixed()
    b = 4
    z, info, den = run(name, {**opts, "block_length": b}, fixed=fixed, steps=9, record_every=1)
    free = fixed < 0
    states = list(info.trajectory) + den.seen
    assert len(states) > 4
    for state in states:
        for row in range(4):
            masked = (state[row] == V) & free[row]
            unmasked = (state[row] != V) & free[row]
            if masked.any():
                current = int(masked.nonzero()[0]) // b  # the first block with a mask is the current one
                assert not unmasked[(current + 1) * b:].any()
    assert info.extras["blocks"] == [[0, 4], [4, 8], [8, 12]]
    assert info.num_steps == (9 if sampler_class(name).uses_grid else info.num_steps)


def test_block_grid_and_steps():
    times = time_grid(12, "cosine")
    assert torch.equal(block_grid(times, 4), times[::3])
    g = block_grid(times, 5)
    assert g[0] == 1 and g[-1] == 0 and (g[1:] < g[:-1]).all()
    assert block_steps(10, 3) == [4, 3, 3]


def test_sliding_window_generates_the_requested_length_with_the_prompt_kept():
    den = CountingDenoiser(length=L)
    prompt = [1, 2, 3, 4, 0]
    fixed = make_fixed(31, prefix=prompt, suffix=[2, 2])
    z, info = sample_long(den, SCHED, batch_size=2, length=31, window=L, vocab_size=V, context=4, fixed=fixed,
                          num_steps=6, generator=gen(0), sampler="confidence", return_info=True)
    assert z.shape == (2, 31) and ((z >= 0) & (z < V)).all()
    assert z[:, :5].tolist() == [prompt] * 2 and z[:, -2:].tolist() == [[2, 2]] * 2
    spans = window_spans(31, L, 4)
    assert spans == [(0, 12), (8, 20), (16, 28), (19, 31)] and info.extras["windows"] == [list(s) for s in spans]
    assert all(s.shape[1] == L for s in den.seen) and info.denoiser_calls == den.calls
    # a call of each window sees the end of the text generated so far as its prompt and masks after it
    ends = [0] + [e for _, e in spans[:-1]]
    user_fixed = fixed[0] >= 0
    for (start, end), before in zip(spans, ends):
        new = torch.arange(start, end) >= before  # generated in this window unless fixed by the user
        want = z[:, start:end].clone()
        want[:, new & ~user_fixed[start:end]] = V
        assert any(torch.equal(seen, want) for seen in den.seen), (start, end)
    z2 = sample_long(den, SCHED, batch_size=2, length=31, window=L, vocab_size=V, context=4, fixed=fixed,
                     num_steps=6, generator=gen(0), sampler="confidence")
    assert torch.equal(z, z2)
    with pytest.raises(ValueError, match="context must lie"):
        sample_long(den, SCHED, batch_size=1, length=31, window=L, vocab_size=V, context=L, num_steps=4)


def test_sliding_window_short_request_is_one_sample_call():
    den = CountingDenoiser()
    z = sample_long(den, SCHED, batch_size=2, length=L, window=L, vocab_size=V, num_steps=5, generator=gen(2))
    ref = sample(CountingDenoiser(), SCHED, batch_size=2, length=L, vocab_size=V, num_steps=5, generator=gen(2))
    assert torch.equal(z, ref)


def test_generate_tokens_beyond_the_model_length_slides_windows():
    """`maskdiff sample --length` above the run's sequence length (the golden run: 32) slides windows."""
    from pathlib import Path

    from maskdiff.apps.generate import generate_tokens

    golden = Path(__file__).resolve().parent / "data" / "golden-run"
    tokens, settings, run = generate_tokens(golden, num=2, length=75, steps=8, prompt="the ", suffix=" end",
                                            sampler="confidence", device="cpu", progress=False)
    texts = [run.tokenizer.decode(row.tolist()) for row in tokens]
    assert tokens.shape == (2, 75) and all(t.startswith("the ") and t.endswith(" end") for t in texts)
    assert settings["windows"] == [[0, 32], [16, 48], [32, 64], [43, 75]]
    assert settings["network_calls_per_sample"] <= 4 * 8
