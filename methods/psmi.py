"""The ``psmi`` detector: pointwise sliced mutual information between a sample's hidden representation
and its training label, at an early checkpoint (Dentan et al., ECAI 2025 §3; estimator of Wongso et al.,
ISIT 2023, Alg. 1). Low PSMI = the representation says little about the label = likely memorized later;
the risk score is −PSMI.

For M directions θ_j drawn uniformly on the unit sphere, project s_ij = θ_jᵀ h_i; per class c and
direction j fit a 1-D Gaussian N(μ_cj, σ_cj) to the class-c projections (π_c the class frequency);
pmi_ij = log N(s_ij; μ_{y_i j}, σ_{y_i j}) − log Σ_c π_c N(s_ij; μ_cj, σ_cj); PSMI_i = mean_j pmi_ij.

``directions: 0`` is the adaptive mode of the authors' package: blocks of 500 directions are added until
the lowest 5 % of PSMI values move by less than 5 % (relative) between n and 2n blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import ClassifierModel, Detector, LabeledSamples

MIN_STD = 1e-6


def psmi(features: torch.Tensor, labels: torch.Tensor, directions: int, generator: torch.Generator,
         num_classes: int | None = None) -> torch.Tensor:
    """PSMI of every row of ``features [N, d]`` with its label, estimated with ``directions`` random
    directions (float64, on the features' device). Classes with fewer than 2 samples have no Gaussian:
    their samples get PSMI 0 and they are left out of the mixture."""
    h = features.double()
    y = labels.to(h.device)
    C = num_classes or int(y.max()) + 1
    theta = torch.randn(h.shape[1], directions, generator=generator, dtype=torch.float64).to(h.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    proj = h @ theta  # [N, M]
    counts = torch.bincount(y, minlength=C)
    present = counts >= 2
    onehot = torch.nn.functional.one_hot(y, C).double()  # [N, C]
    n = counts.double().clamp_min(1)[:, None]
    mean = onehot.T @ proj / n  # [C, M]
    var = onehot.T @ proj**2 / n - mean**2
    std = (var * n / (n - 1).clamp_min(1)).clamp_min(0).sqrt().clamp_min(MIN_STD)  # ddof = 1
    logp = -0.5 * ((proj[None] - mean[:, None]) / std[:, None]) ** 2 - std.log()[:, None] - 0.5 * math.log(2 * math.pi)
    prior = (counts.double() / counts.sum()).clamp_min(1e-300).log()
    mix = torch.logsumexp((logp + prior[:, None, None])[present], dim=0)  # [N, M]
    own = logp[y, torch.arange(len(y), device=h.device)]  # [N, M]
    out = (own - mix).mean(1)
    return torch.where(present[y], out, torch.zeros_like(out))


def adaptive_psmi(features: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, block: int = 500,
                  max_blocks: int = 64, num_classes: int | None = None) -> tuple[torch.Tensor, int]:
    """PSMI with as many 500-direction blocks as needed: stop when the mean of the lowest 5 % of values
    moves by < 5 % (relative) from half as many blocks. Returns (psmi, directions used)."""
    blocks = [psmi(features, labels, block, generator, num_classes)]
    while True:
        n = len(blocks)
        if n >= 2 and n & (n - 1) == 0:
            full, half = torch.stack(blocks).mean(0), torch.stack(blocks[: n // 2]).mean(0)
            k = max(1, int(0.05 * len(full)))
            lo_full, lo_half = full.sort().values[:k].mean(), half.sort().values[:k].mean()
            if abs(lo_full - lo_half) <= 0.05 * abs(lo_half) or n >= max_blocks:
                return full, n * block
        blocks.append(psmi(features, labels, block, generator, num_classes))


class PSMI(Detector):
    name = "psmi"
    summary = "−PSMI (pointwise sliced mutual information) of the hidden state and the training label"
    paper = "Dentan, Buscaldi, Shabou & Vanier, ECAI 2025 (arXiv 2409.18858)"

    @dataclass
    class Config(Detector.Config):
        directions: int = 2000  # M; 0 = adaptive (blocks of 500 until stable)
        layer: int = -1  # hidden layer (−1: the last; the paper's default)

    def score(self, model: ClassifierModel, samples: LabeledSamples, shadows=None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.config.seed)
        feats = model.features(samples, self.config.layer)
        if self.config.directions > 0:
            value = psmi(feats, samples.labels, self.config.directions, gen, model.num_classes)
        else:
            value, _ = adaptive_psmi(feats, samples.labels, gen, num_classes=model.num_classes)
        return -value.float()


@hookimpl
def memeval_methods():
    return [PSMI]
