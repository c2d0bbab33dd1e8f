"""A-priori memorization detection (Dentan et al., ECAI 2025; Carlini et al., S&P 2022)."""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------
# A-priori memorization detection (Dentan et al., ECAI 2025; Carlini et al., S&P 2022)
#
# Ground truth: the local log-LiRA score of each training sample of a target classifier, on the logit gap,
# against shadow models that did (IN) and did not (OUT) train on it; memorized when it is at least η.
# A detector's risk scores are then judged as a ranking of the memorized samples: ROC AUC (the primary,
# :func:`roc_auc`), FPR at TPR = 0.75 (the paper's v1 metric), TPR at FPR = 1 % and precision@k.


def logit_gap(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """g = z_y − max_{y'≠y} z_{y'} per row of class logits ``[N, C]`` with labels ``[N]`` (the margin of
    the trained label; negative when another class wins). Dentan et al. §3, the LiRA "hinge" statistic."""
    z = logits.float()
    own = z.gather(1, labels.view(-1, 1)).squeeze(1)
    others = z.scatter(1, labels.view(-1, 1), float("-inf"))
    return own - others.max(dim=1).values


def gaussian_logpdf(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²), elementwise."""
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


LIRA_CLIP = 100.0
LIRA_MIN_STD = 1e-3


def local_lira(target: torch.Tensor, shadows: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Per-sample local log-LiRA (Carlini et al. 2022 online LiRA; Dentan et al. §3 "memo").

    ``target [N]`` is the statistic (logit gap) of each sample on the target model, ``shadows [K, N]`` on
    K shadow models and ``member [K, N]`` whether shadow k trained on sample n. For each sample a Gaussian
    is fitted to its IN values and one to its OUT values (mean, sample std with ddof = 1, floored at
    ``LIRA_MIN_STD``); the score is log N(target; μ_in, σ_in) − log N(target; μ_out, σ_out), clipped to
    ±``LIRA_CLIP`` as the paper's analysis does. A sample with fewer than 2 IN or 2 OUT values gets NaN.
    """
    shadows, member = shadows.double(), member.bool()
    x = target.double()

    def fit(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = mask.sum(0)
        mean = (shadows * mask).sum(0) / n.clamp_min(1)
        var = (((shadows - mean) ** 2) * mask).sum(0) / (n - 1).clamp_min(1)
        return mean, var.sqrt().clamp_min(LIRA_MIN_STD), n

    mu_in, sd_in, n_in = fit(member)
    mu_out, sd_out, n_out = fit(~member)
    score = (gaussian_logpdf(x, mu_in, sd_in) - gaussian_logpdf(x, mu_out, sd_out)).clamp(-LIRA_CLIP, LIRA_CLIP)
    return torch.where((n_in >= 2) & (n_out >= 2), score, torch.full_like(score, float("nan")))


def _roc(scores: torch.Tensor, gold: torch.Tensor):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(gold.flatten().cpu().numpy().astype(bool), scores.flatten().double().cpu().numpy())
    return fpr, tpr


def fpr_at_tpr(scores: torch.Tensor, gold: torch.Tensor, tpr: float = 0.75) -> float:
    """The lowest false-positive rate of any threshold on ``scores`` whose true-positive rate is at least
    ``tpr`` (ROC operating points, no interpolation; tied scores share one threshold). Dentan et al. v1."""
    f, t = _roc(scores, gold)
    return float(f[t >= tpr - 1e-12].min())


def tpr_at_fpr(scores: torch.Tensor, gold: torch.Tensor, fpr: float = 0.01) -> float:
    """The highest true-positive rate of any threshold on ``scores`` whose false-positive rate is at most
    ``fpr`` (ROC operating points, no interpolation). Carlini et al. 2022's low-FPR metric."""
    f, t = _roc(scores, gold)
    return float(t[f <= fpr + 1e-12].max())


def precision_at_k(scores: torch.Tensor, gold: torch.Tensor, k: int) -> float:
    """Fraction of gold items among the ``k`` highest scores, ties at the cut resolved in expectation
    (a tied group straddling the cut contributes its gold fraction times the places left), so a constant
    score gets the base rate."""
    s, g = scores.flatten().double().cpu(), gold.flatten().bool().cpu()
    k = max(1, min(int(k), s.numel()))
    cut = torch.sort(s, descending=True).values[k - 1]
    above, tied = s > cut, s == cut
    places = k - int(above.sum())
    hits = float(g[above].sum()) + places * float(g[tied].double().mean())
    return hits / k
