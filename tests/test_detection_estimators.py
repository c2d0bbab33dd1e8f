"""Detection estimators by hand: the metrics, local LiRA on known IN/OUT Gaussians, PSMI against closed-form
pointwise mutual information, Mahalanobis, and the paper's prediction-checkpoint rule."""

from __future__ import annotations

import math

import pytest
import torch

from memeval.metrics import fpr_at_tpr, local_lira, logit_gap, precision_at_k, roc_auc, tpr_at_fpr
from memeval.shadows import prediction_checkpoint


# ---------------------------------------------------------------------------------------------- metrics


def test_detection_metrics_hand_computed():
    # scores ranked: 0.9(+) 0.8(-) 0.7(+) 0.6(+) 0.5(-) 0.4(-): 3 positives, 3 negatives
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    g = torch.tensor([1, 0, 1, 1, 0, 0])
    # TPR reaches 2/3 at FPR 1/3, then 1 at FPR 1/3: the first threshold with TPR >= 0.75 has FPR 1/3
    # (linear interpolation between (0, 1/3) and (1/3, 1/3)... would also give 1/3; see the next case)
    assert fpr_at_tpr(s, g, 0.75) == pytest.approx(1 / 3)
    assert tpr_at_fpr(s, g, 0.01) == pytest.approx(1 / 3)  # only the top sample fits under FPR 1 %
    assert tpr_at_fpr(s, g, 1 / 3) == pytest.approx(1.0)
    assert precision_at_k(s, g, 3) == pytest.approx(2 / 3)
    assert roc_auc(s, g) == pytest.approx(7 / 9)  # pairs (pos > neg): 3 + 2 + 2 of 9
    # 4 positives, 4 negatives: TPR 0.75 needs 3 positives; ranked + - - + + - - +
    s2 = torch.arange(8, 0, -1).float()
    g2 = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1])
    # operating points: (0, .25) (.25, .25) (.5, .25) (.5, .5) (.5, .75) ... -> FPR 0.5 at TPR 0.75;
    # an interpolated curve between (.25, .25) and (.5, .75) would give 0.375
    assert fpr_at_tpr(s2, g2, 0.75) == pytest.approx(0.5)
    assert tpr_at_fpr(s2, g2, 0.3) == pytest.approx(0.25)


def test_precision_at_k_ties_and_degenerate_scores():
    g = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0])
    assert precision_at_k(torch.zeros(8), g, 2) == pytest.approx(2 / 8)  # constant score: the base rate
    # 1 above the cut, then a tie of 3 (1 positive) for 1 remaining place: (0 + 1 * 1/3) / 2
    s = torch.tensor([5.0, 1, 1, 1, 0, 0, 0, 0])
    g = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0])
    assert precision_at_k(s, g, 2) == pytest.approx((0 + 1 / 3) / 2)
    # a detector that does nothing: AUC 0.5, FPR@TPR .75 = 1, TPR@FPR 1 % = 0
    assert roc_auc(torch.zeros(8), g) == 0.5
    assert fpr_at_tpr(torch.zeros(8), g, 0.75) == 1.0
    assert tpr_at_fpr(torch.zeros(8), g, 0.01) == 0.0


def test_logit_gap_is_margin_of_the_training_label():
    z = torch.tensor([[1.0, 3.0, 2.0], [5.0, 1.0, 0.0]])
    assert logit_gap(z, torch.tensor([1, 1])).tolist() == [1.0, -4.0]  # 3 - 2; 1 - 5


# ---------------------------------------------------------------------------------------------- LiRA


def test_local_lira_known_in_out_distributions():
    # sample 0: IN values {4, 6} (mean 5, sd √2), OUT {-1, 1} (mean 0, sd √2); target value 5
    # log N(5; 5, √2) - log N(5; 0, √2) = 25 / (2 · 2) = 6.25
    shadows = torch.tensor([[4.0, 0.0], [6.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    member = torch.tensor([[1, 1], [1, 1], [0, 1], [0, 1]]).bool()  # sample 1: no OUT shadow
    out = local_lira(torch.tensor([5.0, 0.0]), shadows, member)
    assert out[0].item() == pytest.approx(6.25)
    assert math.isnan(out[1].item())
    # a target value far beyond both is clipped at ±100
    assert local_lira(torch.tensor([1e4]), shadows[:, :1], member[:, :1]).item() == 100.0


def test_local_lira_separates_members_of_gaussian_in_out():
    gen = torch.Generator().manual_seed(0)
    K, N = 512, 400
    member = torch.rand(K, N, generator=gen) < 0.5
    shadows = torch.randn(K, N, generator=gen) + 3.0 * member  # IN ~ N(3, 1), OUT ~ N(0, 1)
    target_in = torch.randn(N, generator=gen) + 3.0
    # the exact log ratio for N(3,1) vs N(0,1) at x is 3x - 4.5; the estimate converges to it (~256 IN/OUT)
    est = local_lira(target_in, shadows, member)
    exact = 3 * target_in - 4.5
    assert torch.corrcoef(torch.stack([est.float(), exact]))[0, 1] > 0.97
    assert (est - exact).abs().median() < 0.4
    # a non-member (drawn from OUT) gets a negative score in the large majority of cases
    assert (local_lira(torch.randn(N, generator=gen), shadows, member) < 0).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------- PSMI


def _psmi_module():
    from memeval_methods.psmi import adaptive_psmi, psmi

    return psmi, adaptive_psmi


def test_psmi_equals_pointwise_mutual_information_in_one_dimension():
    """d = 1: every direction is ±1, so PSMI is the exact pointwise MI of two Gaussian classes
    N(-1, 1) and N(+1, 1) with equal priors: log N(x; μ_y, 1) - log(½ N(x; -1, 1) + ½ N(x; 1, 1))."""
    psmi, _ = _psmi_module()
    gen = torch.Generator().manual_seed(1)
    n = 20000
    y = torch.randint(0, 2, (n,), generator=gen)
    x = (torch.randn(n, generator=gen) + (2.0 * y - 1.0)).double()
    est = psmi(x[:, None], y, 50, torch.Generator().manual_seed(0))
    mu = 2.0 * y - 1.0
    exact = (-0.5 * (x - mu) ** 2) - torch.logsumexp(torch.stack([-0.5 * (x + 1) ** 2, -0.5 * (x - 1) ** 2]), 0) \
        + math.log(2)
    err = (est - exact).abs()  # only the estimation error of μ_c, σ_c (n = 20,000) remains
    assert float(err.median()) < 0.01 and float(err.quantile(0.99)) < 0.05
    # its mean is the mutual information I(X; Y), by quadrature: ∫ Σ_y ½ p(x|y) pmi(x, y) dx
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    p0, p1 = torch.exp(-0.5 * (grid + 1) ** 2), torch.exp(-0.5 * (grid - 1) ** 2)
    pmi0, pmi1 = torch.log(2 * p0 / (p0 + p1)), torch.log(2 * p1 / (p0 + p1))
    mi = float(((0.5 * p0 * pmi0 + 0.5 * p1 * pmi1) / math.sqrt(2 * math.pi)).sum() * (grid[1] - grid[0]))
    assert float(est.mean()) == pytest.approx(mi, abs=0.01)
    assert 0.3 < mi < 0.5  # 0.4 nats here; a formula without the class priors would differ by log 2


def test_psmi_flags_a_mislabelled_sample_and_is_zero_without_signal():
    psmi, adaptive = _psmi_module()
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(300) % 3
    centres = torch.randn(3, 8, generator=gen) * 4
    x = centres[y] + torch.randn(300, 8, generator=gen)
    labels = y.clone()
    labels[:5] = (y[:5] + 1) % 3  # five training labels reassigned
    value = psmi(x, labels, 500, torch.Generator().manual_seed(0))
    assert set(torch.argsort(value)[:5].tolist()) == set(range(5))  # the five lowest PSMI
    noise = psmi(torch.randn(3000, 8, generator=gen), torch.arange(3000) % 3, 200, torch.Generator().manual_seed(0))
    assert abs(float(noise.mean())) < 0.01
    value2, used = adaptive(x, labels, torch.Generator().manual_seed(0))
    assert used >= 1000 and used % 500 == 0
    assert set(torch.argsort(value2)[:5].tolist()) == set(range(5))


def test_mahalanobis_finds_the_outlier():
    from memeval_methods.mahalanobis import mahalanobis_scores

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 5, generator=gen) @ torch.diag(torch.tensor([5.0, 1, 1, 0.2, 0.2]))
    x[7] = torch.tensor([0.0, 0, 0, 2.0, 0])  # small in Euclidean norm, 10 s.d. along a thin axis
    d = mahalanobis_scores(x, dims=100)
    assert int(d.argmax()) == 7
    assert int(x.norm(dim=1).argmax()) != 7  # a Euclidean distance would not find it


# ---------------------------------------------------------------------------------------------- the rule


def test_prediction_checkpoint_rule():
    # drops: 50 %, 90 %, 96 %, 99.5 %: closest to 95 % is the third checkpoint; minus one = the second
    assert prediction_checkpoint([0.1, 0.2, 0.3, 0.4], [2.0, 1.0, 0.2, 0.08, 0.01]) == 1
    # closest is the first checkpoint: "minus one" would be the untrained model -> the first checkpoint
    assert prediction_checkpoint([0.1, 0.2], [2.0, 0.1, 0.0]) == 0
