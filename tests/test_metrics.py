"""Metrics against cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from ctrldiff.errors import CtrlDiffError
from ctrldiff.eval.metrics import (
    classifier_accuracy,
    diversity,
    frechet_distance,
    frechet_distance_from_features,
    mmd,
    objective,
    optimality_gap,
    reward_stats,
    sliced_wasserstein,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_reward_stats_overall_and_per_condition():
    r = torch.tensor([1.0, 3.0, 5.0, 7.0])
    s = reward_stats(r, conds=torch.tensor([0, 0, 1, 1]))
    assert s["mean"] == pytest.approx(4.0) and s["std"] == pytest.approx(math.sqrt(5.0)) and s["count"] == 4
    assert s["per_cond"][0] == pytest.approx({"mean": 2.0, "std": 1.0, "count": 2})
    assert s["per_cond"][1] == pytest.approx({"mean": 6.0, "std": 1.0, "count": 2})
    assert "per_cond" not in reward_stats(r)
    with pytest.raises(CtrlDiffError):
        reward_stats(r, conds=torch.tensor([0, 1]))


def _mmd_bruteforce(x, y, hs):
    def k(a, b):
        d2 = torch.cdist(a.double(), b.double()) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in hs) / len(hs)

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return float((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
                 - 2 * k(x, y).mean())


@pytest.mark.parametrize("hs", [[0.3, 0.6, 1.2, 2.4, 4.8], [0.5, 0.7, 3.0], [1.0]])
def test_mmd_matches_bruteforce_for_any_chunking(hs):
    x, y = torch.randn(70, 3, generator=gen(1)), torch.randn(50, 3, generator=gen(2)) + 0.5
    ref = _mmd_bruteforce(x, y, hs)
    assert mmd(x, y, hs) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert mmd(x, y, hs, chunk=16) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_mmd_same_distribution_near_zero_and_different_clearly_positive():
    g = gen(3)
    x, y = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    # a sample with itself: the unbiased estimate is 2 (mean_{i!=j} k - 1) / N, in (-2/N, 0]
    assert -2 / 800 < mmd(x, x) <= 1e-12
    same = mmd(x, y)
    shifted = mmd(x, y + torch.tensor([1.0, 0.0]))
    wider = mmd(x, 2.0 * y)
    assert abs(same) < 3e-3
    assert shifted > 0.05 and wider > 0.05
    assert mmd(x, y + torch.tensor([0.3, 0.0])) < shifted  # grows with the shift


def test_sliced_wasserstein_gaussian_shift():
    """theta.X ~ N(0, 1) vs N(theta.m, 1): W_2^2 = (theta.m)^2, so SW_2^2 = E (theta.m)^2 = |m|^2 / d;
    W_1 = |theta.m|, and in d = 2 E|cos phi| = 2 / pi, so SW_1 = 2 |m| / pi."""
    g = gen(4)
    m = torch.tensor([3.0, 0.0])
    x, y = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g) + m
    assert sliced_wasserstein(x, y, 1000, p=2, generator=g) == pytest.approx(3.0 / math.sqrt(2), rel=0.04)
    assert sliced_wasserstein(x, y, 1000, p=1, generator=g) == pytest.approx(6.0 / math.pi, rel=0.04)
    # unequal sizes (quantile interpolation) and d = 3
    m3 = torch.tensor([2.0, -2.0, 1.0])
    x3, y3 = torch.randn(2000, 3, generator=g), torch.randn(1300, 3, generator=g) + m3
    assert sliced_wasserstein(x3, y3, 1000, generator=g) == pytest.approx(3.0 / math.sqrt(3), rel=0.05)
    assert sliced_wasserstein(x, x, 50, generator=g) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(x, torch.randn(1500, 2, generator=g), 200, generator=g) < 0.08


def _closed_form_diag(mu1, v1, mu2, v2):
    return float(((mu1 - mu2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum())


def test_frechet_distance_diagonal_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    fd = frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert fd == pytest.approx(_closed_form_diag(mu1, v1, mu2, v2), rel=1e-10)
    assert frechet_distance(mu1, torch.diag(v1), mu1, torch.diag(v1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_full_covariance_against_scipy_and_rank_deficient():
    linalg = pytest.importorskip("scipy.linalg")
    g = gen(5)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    c1, c2 = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64), b @ b.T
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    covmean = linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    ref = float((mu1 - mu2).pow(2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * covmean.trace())
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)
    low = a[:, :2] @ a[:, :2].T  # rank 2: must stay finite and >= 0
    fd = frechet_distance(mu1, low, mu1, low)
    assert math.isfinite(fd) and fd == pytest.approx(0.0, abs=1e-5)


def test_frechet_from_features_converges_to_gaussian_value():
    g = gen(6)
    f1 = torch.randn(10000, 2, generator=g) * torch.tensor([1.0, 2.0])
    f2 = torch.randn(10000, 2, generator=g) * torch.tensor([3.0, 1.0]) + torch.tensor([1.0, 0.0])
    ref = _closed_form_diag(torch.zeros(2), torch.tensor([1.0, 4.0]), torch.tensor([1.0, 0.0]), torch.tensor([9.0, 1.0]))
    assert frechet_distance_from_features(f1, f2) == pytest.approx(ref, rel=0.03)
    assert frechet_distance_from_features(f1, f1) == pytest.approx(0.0, abs=1e-8)


def test_diversity_known_values():
    f = torch.tensor([[0.0], [1.0], [3.0], [10.0], [14.0]])
    d = diversity(f, conds=torch.tensor([0, 0, 0, 1, 1]))
    assert d["per_cond"][0] == pytest.approx(2.0)  # pairs 1, 3, 2
    assert d["per_cond"][1] == pytest.approx(4.0)
    pairs = [abs(a - b) for i, a in enumerate([0, 1, 3, 10, 14]) for b in [0, 1, 3, 10, 14][i + 1:]]
    assert d["overall"] == pytest.approx(sum(pairs) / len(pairs))
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert diversity(pts)["overall"] == pytest.approx(5.0)
    assert math.isnan(diversity(pts, conds=torch.tensor([0, 1]))["per_cond"][0])


def test_classifier_accuracy():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 0.0], [0.0, 1.0, 0.5]])
    assert classifier_accuracy(logits, torch.tensor([0, 2, 0, 1])) == pytest.approx(0.75)
    with pytest.raises(CtrlDiffError):
        classifier_accuracy(logits, torch.tensor([0, 1]))


def test_objective_and_optimality_gap():
    assert objective(2.0, 0.5, 0.1) == pytest.approx(1.95)
    assert objective(torch.tensor([1.0, 3.0]), torch.tensor([0.2, 0.4]), 1.0) == pytest.approx(1.7)
    assert optimality_gap(2.0, 1.5) == pytest.approx(0.25)
    assert optimality_gap(-2.0, -3.0) == pytest.approx(0.5)
    assert optimality_gap(1.0, 1.0) == 0.0
    with pytest.raises(CtrlDiffError):
        optimality_gap(0.0, 1.0)
