"""maskdiff.metrics: unit conversions, the Monte Carlo mean and the token-weighted ratio estimator
(docs/math.md, "Evaluation")."""

import math

import pytest
import torch

from maskdiff import metrics
from maskdiff.metrics import MeanEstimate, eval_seed, mean_estimate, ratio_estimate


def test_ratio_estimate_equals_mean_estimate_with_equal_counts():
    y = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 90
    length = 32
    ratio = ratio_estimate(y, torch.full((40,), float(length)))
    mean = mean_estimate(y / length)
    assert ratio.n == mean.n == 40
    assert ratio.mean == pytest.approx(mean.mean, rel=1e-14)
    assert ratio.stderr == pytest.approx(mean.stderr, rel=1e-12)


def test_ratio_estimate_by_hand():
    # R = 18/7; residuals S - R n = 3/7, -1/7, -2/7; Σ² = 2/7; se = sqrt(2/7 / (3·2)) / (7/3)
    est = ratio_estimate([3.0, 5.0, 10.0], [1.0, 2.0, 4.0])
    assert est.mean == pytest.approx(18 / 7, rel=1e-15)
    assert est.stderr == pytest.approx(3 / (7 * math.sqrt(21)), rel=1e-14)
    assert est.n == 3
    # Power: the case tells the estimator from the plausible wrong ones.
    assert abs(est.mean - (3 + 2.5 + 2.5) / 3) > 0.05  # the unweighted mean of the ratios
    assert abs(est.stderr - mean_estimate(torch.tensor([3.0, 2.5, 2.5])).stderr) > 0.05
    assert abs(est.stderr - math.sqrt(2 / 7 / 6)) > 0.05  # without the division by mean(n)


def test_ratio_estimate_stderr_is_calibrated():
    """Over many replicates of N units of varying size the standard error matches the spread of R
    (a formula missing mean(n), or the stderr of the unweighted mean of ratios, is far off)."""
    g = torch.Generator().manual_seed(1)
    reps, units = 4000, 60
    n = torch.randint(1, 30, (reps, units), generator=g).double()
    s = 2.0 * n + torch.randn(reps, units, generator=g, dtype=torch.float64) * n.sqrt() * 1.5
    estimates = [ratio_estimate(s[i], n[i]) for i in range(reps)]
    spread = torch.tensor([e.mean for e in estimates]).std().item()
    mean_se = sum(e.stderr for e in estimates) / reps
    assert mean_se == pytest.approx(spread, rel=0.05)
    naive = sum(mean_estimate(s[i] / n[i]).stderr for i in range(200)) / 200
    assert abs(naive / spread - 1) > 0.3


def test_ratio_estimate_edge_cases():
    one = ratio_estimate([4.0], [2.0])
    assert one.mean == 2.0 and one.stderr == float("inf") and one.n == 1
    assert ratio_estimate([1.0, 0.0], [2.0, 0.0]).mean == 0.5  # a unit without tokens still counts
    with pytest.raises(ValueError, match="zero"):
        ratio_estimate([], [])
    with pytest.raises(ValueError, match="zero"):
        ratio_estimate([1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="differ in length"):
        ratio_estimate([1.0, 2.0], [1.0])


def test_z95_intervals_and_eval_seed():
    assert metrics.Z95 == pytest.approx(1.959963984540054, rel=1e-15)
    lo, hi = MeanEstimate(1.0, 0.5, 10).ci95
    assert (lo, hi) == (1.0 - 0.5 * metrics.Z95, 1.0 + 0.5 * metrics.Z95)
    # the per-batch seed of every evaluation, unchanged since 0.1.0
    assert eval_seed(0, 5) == 5 and eval_seed(3, 2) == 3 * 1_000_003 + 2


def test_unit_conversions():
    assert metrics.nats_to_bits(math.log(2)) == pytest.approx(1.0)
    assert metrics.bits_per_token(32 * math.log(2), 32) == pytest.approx(1.0)
    assert metrics.perplexity(math.log(50.0)) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        metrics.bits_per_token(1.0, 0)
