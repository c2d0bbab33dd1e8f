"""The ``mahalanobis`` detector: Mahalanobis distance of each sample's hidden state to the class-agnostic
distribution of all training samples' hidden states, after PCA to 100 dimensions (an outlier = likely
memorized later). Dentan et al., ECAI 2025, baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import ClassifierModel, Detector, LabeledSamples


def mahalanobis_scores(features: torch.Tensor, dims: int = 100, ridge: float = 1e-6) -> torch.Tensor:
    """Distance of each row of ``features [N, d]`` to their mean under their covariance, in the space of
    the top ``min(dims, d, N − 1)`` principal components (a ``ridge`` × mean eigenvalue keeps it finite)."""
    x = features.double()
    x = x - x.mean(0)
    k = max(1, min(dims, x.shape[1], x.shape[0] - 1))
    _, s, v = torch.linalg.svd(x, full_matrices=False)
    z = x @ v[:k].T  # PCA coordinates: uncorrelated, variance s² / (N − 1)
    var = s[:k] ** 2 / max(1, x.shape[0] - 1)
    var = var + ridge * var.mean()
    return ((z**2) / var).sum(1).sqrt()


class Mahalanobis(Detector):
    name = "mahalanobis"
    summary = "Class-agnostic Mahalanobis distance of the hidden state (PCA to 100 dimensions)"
    paper = "Dentan, Buscaldi, Shabou & Vanier, ECAI 2025 (baseline)"

    @dataclass
    class Config(Detector.Config):
        dims: int = 100
        layer: int = -1

    def score(self, model: ClassifierModel, samples: LabeledSamples, shadows=None) -> torch.Tensor:
        return mahalanobis_scores(model.features(samples, self.config.layer), self.config.dims).float()


@hookimpl
def memeval_methods():
    return [Mahalanobis]
