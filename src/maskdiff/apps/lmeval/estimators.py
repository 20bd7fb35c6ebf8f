"""Log-likelihoods of scored tokens given fixed context tokens, under a maskdiff model.

This is the arithmetic behind the lm-evaluation-harness adapter (:mod:`maskdiff.apps.lmeval`);
it knows nothing of the harness. A :class:`Window` is at most the model's ``seq_len`` tokens, the
first ``n_context`` of which are context (never masked, never scored) and the other ``n`` scored.
:class:`LikelihoodEstimator` estimates ``-log p(scored | context)`` in nats for each window
(docs/lm-eval.md, "What is estimated"):

* ``likelihood="elbo"``, MD4 (scalar schedule), ``estimator="counts"`` (default): the model's
  continuous-time negative ELBO with the context held fixed, written as an expectation over the
  number m of masked scored tokens (:func:`mask_count_probabilities`)::

      -log p(x_S | x_C) ≤ n (1 - α(0)) log V + n α(1) log V
                          + (α(0) - α(1)) · n · E_{m ~ q} E_{|M| = m} [ (1/m) Σ_{i ∈ M} -log μ_θ(z_M, t)_{i, x_i} ]

  with M a uniformly random set of m scored positions, z_M the window with M masked, and t drawn
  from its law given m (:func:`draw_mask_counts`). It equals :func:`maskdiff.losses.md4_loss_terms`'
  bound (the same integral, substituted a = α(t)). Variance reduction: the K draws of a window are
  stratified in the mask count (strata of two draws, each stratum a band of q's quantiles; the
  error :func:`stratified_stderr` is unbiased). A model that predicts uniformly gives exactly
  n log V on every draw: Monte Carlo error 0.
* ``likelihood="elbo"``, ``estimator="times"`` (MD4) and every GenMD4 run: the library's own loss,
  :class:`maskdiff.model.MaskedDiffusion` ``forward`` with a score mask on the scored tokens, K rows
  per window with independent times (error sd/√K) and a network wrapper that puts the context back
  before every call (:class:`ContextNetwork`), so the context is never masked. GenMD4's per-token
  schedule has no mask-count form.
* ``likelihood="exact-order"``: the exact log-likelihood of the left-to-right unmasking order:
  one network row per scored token j, with tokens j, j+1, ... masked, scoring token j. A proper
  normalised likelihood (of the autoregressive model that order defines), not the diffusion bound.
* the AR baseline (``method="ar"``): its exact next-token log-likelihood, under either option.

``is_greedy`` (:attr:`Estimate.greedy`) is, for every option, whether the left-to-right argmax
decode (the exact-order procedure, or the AR model's own) reproduces the scored tokens.

Each window's draws use a generator seeded from the run seed and the window's tokens
(:func:`window_seed`), so an estimate does not depend on batching or on the other requests.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from maskdiff.cross_entropy import default_chunk_size
from maskdiff.model import MaskedDiffusion
from maskdiff.schedules import GenMD4Schedule, Schedule

__all__ = [
    "LIKELIHOODS",
    "ESTIMATORS",
    "Window",
    "Estimate",
    "LikelihoodEstimator",
    "ContextNetwork",
    "mask_count_probabilities",
    "draw_mask_counts",
    "time_of_alpha",
    "window_seed",
]

LIKELIHOODS = ("elbo", "exact-order")
ESTIMATORS = ("counts", "times")


@dataclass(frozen=True)
class Window:
    """Tokens (at most the model's length): ``n_context`` context tokens, then the scored ones."""

    tokens: tuple[int, ...]
    n_context: int

    @property
    def n_scored(self) -> int:
        return len(self.tokens) - self.n_context


@dataclass
class Estimate:
    """``nats``: the estimate of -log p(scored | context); ``stderr``: its Monte Carlo standard error
    (0 when exact, NaN with a single draw); ``draws``: Monte Carlo draws (0: exact); ``greedy``:
    whether the left-to-right argmax decode gives the scored tokens (None: not computed)."""

    nats: float
    stderr: float
    draws: int
    greedy: bool | None = None


def window_seed(seed: int, window: Window) -> int:
    """A 63-bit seed from the run seed and the window's tokens (stable across processes)."""
    data = f"{seed}|{window.n_context}|{','.join(map(str, window.tokens))}".encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & (2**63 - 1)


# ----------------------------------------------------------------------------------------------
# The mask-count form of the MD4 bound


def _binomial_survival(n: int, x: float) -> Tensor:
    """P(Bin(n, x) ≥ j) for j = 0..n, float64 (n + 1,)."""
    j = torch.arange(n + 1, dtype=torch.float64)
    if x <= 0.0 or x >= 1.0:
        return (j <= (n if x >= 1.0 else 0)).double()
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
               + j * math.log(x) + (n - j) * math.log1p(-x))
    return torch.flip(torch.cumsum(torch.flip(log_pmf.exp(), [0]), 0), [0])


def mask_count_probabilities(n: int, alpha0: float, alpha1: float) -> Tensor:
    """q(m), m = 1..n: the law of the number of masked scored tokens in the mask-count form, (n,).

    With a ~ U[α(1), α(0)] and m - 1 ~ Bin(n - 1, 1 - a) (one position masked for sure, each other
    one with probability 1 - a)::

        q(m) = [P(Bin(n, α(0)) ≥ n - m + 1) - P(Bin(n, α(1)) ≥ n - m + 1)] / (n (α(0) - α(1)))

    (∫_0^x C(n-1, m-1) (1-a)^{m-1} a^{n-m} da = P(Bin(n, x) ≥ n - m + 1) / n). Uniform 1/n when
    α(0) = 1 and α(1) = 0.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not alpha0 > alpha1:
        raise ValueError(f"the schedule must decrease: alpha(0)={alpha0} ≤ alpha(1)={alpha1}")
    m = torch.arange(1, n + 1)
    hi, lo = _binomial_survival(n, alpha0), _binomial_survival(n, alpha1)
    q = (hi[n - m + 1] - lo[n - m + 1]).clamp_min(0.0) / (n * (alpha0 - alpha1))
    return q / q.sum()  # exact up to float64 rounding; renormalised against it


def _order_statistic(n: int, rank: Tensor, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    """Draws of the ``rank``-th smallest (1-based, (K,)) of n uniforms, i.e. Beta(rank, n + 1 - rank),
    restricted to [lo, hi] by rejection; float64 (K,)."""
    out = torch.empty(rank.shape, dtype=torch.float64)
    todo = torch.ones(rank.shape, dtype=torch.bool)
    for _ in range(10_000):  # the rejected mass is about n·(1 - hi + lo) at worst, far below 1
        idx = todo.nonzero(as_tuple=True)[0]
        u = torch.rand(len(idx), n, generator=generator, dtype=torch.float64).sort(-1).values
        cand = u.gather(1, (rank[idx] - 1)[:, None]).squeeze(1)
        ok = (cand >= lo) & (cand <= hi)
        out[idx[ok]] = cand[ok]
        todo[idx[ok]] = False
        if not todo.any():
            return out
    raise RuntimeError(f"could not draw alpha in [{lo}, {hi}] for n={n}: the schedule's range is too narrow")


def strata_of(draws: int) -> Tensor:
    """The stratum of each of K draws, (K,) long: strata of two draws (K odd: the last of three), so
    that every stratum has its own variance estimate; K = 1 is one stratum of one draw."""
    if draws < 2:
        return torch.zeros(draws, dtype=torch.long)
    return (torch.arange(draws) // 2).clamp(max=draws // 2 - 1)


def draw_mask_counts(n: int, draws: int, alpha0: float, alpha1: float,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """K = ``draws`` stratified draws of (m, a): mask counts m (K,) long and α values a (K,) float64.

    Stratified sampling of q (:func:`mask_count_probabilities`, CDF Q): stratum h of
    :func:`strata_of` owns the probability band [c_h/K, (c_h + n_h)/K) (c_h draws before it, n_h in
    it) and each of its draws is m = Q⁻¹(u) for its own uniform u in the band, so every m_k has law
    q, the counts cover q's quantiles evenly, and draws are independent within a stratum. Then a_k
    given m_k has density ∝ (1-a)^{m-1} a^{n-m} on [α(1), α(0)], a Beta(n-m+1, m) restricted to that
    range, drawn as the (n-m+1)-th smallest of n uniforms. (m, a) has the mask-count form's joint law.
    """
    q = mask_count_probabilities(n, alpha0, alpha1)
    cdf = torch.cumsum(q, 0)
    strata = strata_of(draws)
    sizes = torch.bincount(strata).double()
    start = torch.cumsum(sizes, 0) - sizes  # c_h
    u = (start[strata] + sizes[strata] * torch.rand(draws, generator=generator, dtype=torch.float64)) / draws
    m = (torch.searchsorted(cdf, u, right=True) + 1).clamp(max=n)
    a = _order_statistic(n, n - m + 1, alpha1, alpha0, generator)
    return m, a


def stratified_stderr(values: Tensor, strata: Tensor) -> float:
    """Standard error of the mean of K stratified draws (proportional allocation: stratum h holds
    n_h of the K draws and 1/K of the probability per draw): sqrt(Σ_h n_h s_h²) / K with s_h² the
    within-stratum sample variance, unbiased when every stratum has two draws or more; NaN for K = 1.
    With one stratum it is the plain sd/√K of independent draws."""
    k = values.numel()
    if k < 2:
        return math.nan
    total = 0.0
    for h in strata.unique():
        v = values[strata == h].double()
        total += v.numel() * float(v.var(unbiased=True))
    return math.sqrt(total) / k


def time_of_alpha(schedule: Schedule, a: Tensor) -> Tensor:
    """t with α(t) = a for a scalar schedule (α decreasing), by bisection in float64; a (K,) → t (K,)."""
    lo = torch.zeros_like(a, dtype=torch.float64)
    hi = torch.ones_like(a, dtype=torch.float64)
    for _ in range(60):  # 2^-60: below float64 resolution of t
        mid = 0.5 * (lo + hi)
        later = schedule.alpha(mid) > a  # α(mid) still above a: the time is after mid
        lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------
# The network


class ContextNetwork(nn.Module):
    """A denoiser network with the context put back before every call: positions where ``known``
    (bool (b, L)) is True always hold their tokens ``x`` (b, L), whatever the masking process drew.
    Calls with a multiple of b rows (GenMD4 evaluates two masked copies) tile x and known."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.vocab_size = network.vocab_size
        self.causal = network.causal
        self.time_conditioning = network.time_conditioning
        self.null_label = getattr(network, "null_label", None)
        self.x: Tensor | None = None
        self.known: Tensor | None = None

    @property
    def head_weight(self) -> Tensor:
        return self.network.head_weight

    def set_context(self, x: Tensor, known: Tensor) -> None:
        self.x, self.known = x, known

    def forward(self, z: Tensor, t: Tensor | None = None, labels: Tensor | None = None, *,
                return_hidden: bool = False) -> Tensor:
        assert self.x is not None and self.known is not None, "set_context first"
        reps = z.shape[0] // self.x.shape[0]
        z = torch.where(self.known.repeat(reps, 1), self.x.repeat(reps, 1), z)
        return self.network(z, t, labels=labels, return_hidden=return_hidden)


def _head_at(network: nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """-log softmax(h Wᵀ)[y] and whether y is the argmax, for selected hidden states h (N, D) and
    targets y (N,); the logits are formed in chunks of about 128 MiB. Returns float64 (N,), bool (N,)."""
    weight = network.head_weight
    step = default_chunk_size(weight.shape[0])
    nll, top = [], []
    for start in range(0, hidden.shape[0], step):
        logits = (hidden[start:start + step].float() @ weight.float().T)  # (c, V)
        y = targets[start:start + step]
        logp = torch.log_softmax(logits.double(), -1)
        nll.append(-logp.gather(1, y[:, None]).squeeze(1))
        top.append(logits.argmax(-1) == y)
    if not nll:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(nll), torch.cat(top)


@dataclass
class _Row:
    """One network row: input z (L,) at time t (None: the AR network), scoring ``targets`` (P,) at
    ``positions`` (P,); ``window`` is the index of the window it belongs to."""

    window: int
    z: Tensor
    t: float | None
    positions: Tensor
    targets: Tensor


class LikelihoodEstimator:
    """Estimates -log p(scored | context) for :class:`Window` s under a loaded model (see the module docs).

    Args:
        model: a :class:`maskdiff.model.MaskedDiffusion` (MD4, GenMD4 or the AR baseline), in eval mode.
        likelihood: ``"elbo"`` or ``"exact-order"``. estimator: ``"counts"`` or ``"times"`` (MD4's ELBO).
        draws: K, Monte Carlo draws per window (the ELBO; the exact options ignore it).
        batch_size: network rows per call. seed: the run seed of :func:`window_seed`.
        greedy: compute :attr:`Estimate.greedy` (one extra row per scored token for the ELBO).
        device: where the network runs. progress: a tqdm bar over the network calls.
    """

    def __init__(self, model: MaskedDiffusion, *, likelihood: str = "elbo", estimator: str = "counts",
                 draws: int = 4, batch_size: int = 32, seed: int = 0, greedy: bool = True,
                 device: str | torch.device = "cpu", progress: bool = False) -> None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r}: choose one of {', '.join(LIKELIHOODS)}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r}: choose one of {', '.join(ESTIMATORS)}")
        for name, value in (("draws", draws), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        self.model, self.network = model, model.network
        self.method, self.schedule = model.method, model.schedule
        self.vocab_size = int(model.vocab_size)
        self.seq_len = int(model.network.seq_len)
        self.likelihood, self.draws, self.batch_size, self.seed = likelihood, draws, batch_size, seed
        self.greedy, self.device, self.progress = greedy, torch.device(device), progress
        # The mask-count form needs one scalar schedule; GenMD4 uses its own loss.
        self.estimator = "times" if self.method == "genmd4" else estimator
        self.exact = self.method == "ar" or likelihood == "exact-order"
        if not isinstance(self.schedule, GenMD4Schedule) and self.method != "ar":
            self.alpha0 = float(self.schedule.alpha(torch.zeros((), dtype=torch.float64)))
            self.alpha1 = float(self.schedule.alpha(torch.ones((), dtype=torch.float64)))
        self._context_model: MaskedDiffusion | None = None

    # -- public ----------------------------------------------------------------------------------

    @torch.no_grad()
    def estimate(self, windows: Sequence[Window], *, greedy: bool | None = None) -> list[Estimate]:
        """One :class:`Estimate` per window, in order; ``greedy`` overrides the instance's setting
        (rolling perplexity needs no greedy check: False)."""
        greedy = self.greedy if greedy is None else greedy
        for w in windows:
            if len(w.tokens) > self.seq_len or not 0 <= w.n_context <= len(w.tokens):
                raise ValueError(f"a window of {len(w.tokens)} tokens with {w.n_context} context tokens does not fit "
                                 f"the model's {self.seq_len}")
        out: list[Estimate | None] = [Estimate(0.0, 0.0, 0, True) if w.n_scored == 0 else None for w in windows]
        todo = [i for i, w in enumerate(windows) if w.n_scored > 0]
        if self.method == "ar":
            rows = [self._ar_row(i, windows[i]) for i in todo]
            for i, (nll, ok) in self._grouped(rows, self._score_rows(rows)).items():
                out[i] = Estimate(float(sum(n.sum() for n in nll)), 0.0, 0, bool(all(o.all() for o in ok)))
            return out  # type: ignore[return-value]
        if self.exact or greedy:
            rows = [row for i in todo for row in self._order_rows(i, windows[i])]
            for i, (nll, ok) in self._grouped(rows, self._score_rows(rows)).items():
                total, decoded = float(torch.cat(nll).sum()), bool(torch.cat(ok).all())
                out[i] = Estimate(total, 0.0, 0, decoded) if self.exact else Estimate(math.nan, math.nan, 0, decoded)
        if not self.exact:
            for i, (draws, strata) in self._elbo_draws(windows, todo).items():
                k = draws.numel()
                stderr = stratified_stderr(draws, strata)
                decoded = out[i].greedy if out[i] is not None else None  # type: ignore[union-attr]
                out[i] = Estimate(float(draws.mean()), stderr, k, decoded)
        return out  # type: ignore[return-value]

    # -- rows ------------------------------------------------------------------------------------

    def _ar_row(self, i: int, w: Window) -> _Row:
        """The AR baseline's row: input [BOS = V] + tokens[:-1] (maskdiff.losses.ar_nll_terms'
        convention), scoring the window's scored tokens."""
        x = torch.tensor(w.tokens, dtype=torch.long)
        z = torch.cat([torch.tensor([self.vocab_size]), x[:-1]])
        pos = torch.arange(w.n_context, len(w.tokens))
        return _Row(i, z, None, pos, x[pos])

    def _order_time(self, masked_fraction: Tensor) -> Tensor:
        """The time a row of the left-to-right order is shown: where the schedule masks that fraction
        of the scored tokens (scalar schedules: α(t) = 1 - f; GenMD4: t = f^(1/mean exponent))."""
        if isinstance(self.schedule, GenMD4Schedule):
            w_mean = float(self.schedule.exponents.double().mean())
            return masked_fraction.double() ** (1.0 / w_mean)
        a = (1.0 - masked_fraction.double()).clamp(self.alpha1, self.alpha0)
        return time_of_alpha(self.schedule, a)

    def _order_rows(self, i: int, w: Window) -> list[_Row]:
        """Rows of the left-to-right order: row j masks scored tokens j, j+1, ... and scores token j."""
        x = torch.tensor(w.tokens, dtype=torch.long)
        n, c = w.n_scored, w.n_context
        times = self._order_time((n - torch.arange(n)) / n).tolist()
        rows = []
        for j in range(n):
            z = x.clone()
            z[c + j:] = self.vocab_size
            rows.append(_Row(i, z, times[j], torch.tensor([c + j]), x[c + j:c + j + 1]))
        return rows

    def _count_rows(self, i: int, w: Window) -> list[_Row]:
        """K rows of the mask-count form: m_k scored positions masked at random, time t_k."""
        g = torch.Generator().manual_seed(window_seed(self.seed, w))
        x = torch.tensor(w.tokens, dtype=torch.long)
        n, c = w.n_scored, w.n_context
        m, a = draw_mask_counts(n, self.draws, self.alpha0, self.alpha1, g)
        t = time_of_alpha(self.schedule, a).tolist()
        rows = []
        for k in range(self.draws):
            pos = c + torch.rand(n, generator=g).argsort()[: int(m[k])].sort().values  # a uniform m-subset
            z = x.clone()
            z[pos] = self.vocab_size
            rows.append(_Row(i, z, t[k], pos, x[pos]))
        return rows

    @staticmethod
    def _grouped(rows: list[_Row], scores: list[tuple[Tensor, Tensor]]) -> dict[int, tuple[list[Tensor], list[Tensor]]]:
        """Row scores gathered per window, rows in order: {window: ([nll (P,)...], [argmax ok (P,)...])}."""
        out: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        for row, (nll, ok) in zip(rows, scores):
            entry = out.setdefault(row.window, ([], []))
            entry[0].append(nll)
            entry[1].append(ok)
        return out

    def _score_rows(self, rows: list[_Row]) -> list[tuple[Tensor, Tensor]]:
        """Run the network on every row, rows of one length batched together (``batch_size`` a call);
        returns per row (-log μ at its positions (P,) float64, argmax equals the target (P,) bool)."""
        order = sorted(range(len(rows)), key=lambda r: len(rows[r].z))
        batches, start = [], 0
        while start < len(order):
            length = len(rows[order[start]].z)
            stop = start
            while stop < len(order) and stop - start < self.batch_size and len(rows[order[stop]].z) == length:
                stop += 1
            batches.append(order[start:stop])
            start = stop
        results: list[tuple[Tensor, Tensor]] = [None] * len(rows)  # type: ignore[list-item]
        for batch in self._bar(batches, "network calls"):
            z = torch.stack([rows[r].z for r in batch]).to(self.device)
            t = None if rows[batch[0]].t is None else torch.tensor([rows[r].t for r in batch], dtype=torch.float32,
                                                                   device=self.device)
            hidden = self.network(z, t, return_hidden=True)  # (b, L, D)
            b_idx = torch.cat([torch.full((len(rows[r].positions),), k) for k, r in enumerate(batch)])
            pos = torch.cat([rows[r].positions for r in batch])
            targets = torch.cat([rows[r].targets for r in batch]).to(self.device)
            nll, ok = _head_at(self.network, hidden[b_idx.to(self.device), pos.to(self.device)], targets)
            sizes = [len(rows[r].positions) for r in batch]
            for r, n_r, ok_r in zip(batch, nll.cpu().split(sizes), ok.cpu().split(sizes)):
                results[r] = (n_r, ok_r)
        return results

    def _bar(self, items: list[Any], desc: str) -> Any:
        if not self.progress or not items:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="call", leave=False)

    # -- the ELBO ----------------------------------------------------------------------------------

    def _elbo_draws(self, windows: Sequence[Window], todo: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
        """K negative-ELBO draws (nats, float64 (K,)) per window, with their strata (K,)."""
        if self.estimator == "counts":
            rows = [row for i in todo for row in self._count_rows(i, windows[i])]
            log_v = math.log(self.vocab_size)
            out = {}
            for i, (nll, _) in self._grouped(rows, self._score_rows(rows)).items():
                n = windows[i].n_scored
                diffusion = torch.stack([(self.alpha0 - self.alpha1) * n * v.mean() for v in nll])  # (K,)
                # reconstruction n (1 - α(0)) log V and prior n α(1) log V, as in maskdiff.losses
                out[i] = (diffusion + n * (1.0 - self.alpha0) * log_v + n * self.alpha1 * log_v, strata_of(self.draws))
            return out
        return {i: (self._library_draws(windows[i]), torch.zeros(self.draws, dtype=torch.long))
                for i in self._bar(todo, "windows")}

    def _library_draws(self, w: Window) -> Tensor:
        """K independent draws of the library's loss (MaskedDiffusion.forward) with the context held
        fixed. Times are drawn independently (not the loss's antithetic stratification, whose single
        offset leaves no unbiased estimate of the error), so sd/√K is the Monte Carlo error."""
        if self._context_model is None:
            m = self.model
            self._context_model = MaskedDiffusion(ContextNetwork(m.network), m.schedule, m.method, t1=m.t1,
                                                  antithetic=False, chunked_loss=m.chunked_loss).eval()
        g = torch.Generator().manual_seed(window_seed(self.seed, w))
        x = torch.tensor(w.tokens, dtype=torch.long, device=self.device).repeat(self.draws, 1)  # (K, L)
        known = torch.zeros_like(x, dtype=torch.bool)
        known[:, : w.n_context] = True
        self._context_model.network.set_context(x, known)
        try:
            terms = self._context_model(x, generator=g, score_mask=~known)
        finally:
            self._context_model.network.set_context(None, None)  # type: ignore[arg-type]
        return terms["nelbo"].double().cpu()
