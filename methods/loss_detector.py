"""The ``loss`` detector: cross-entropy of the training label at the early checkpoint (high = likely
memorized later). Dentan et al., ECAI 2025, baseline; over the classes' logits (for a causal LM, the
label tokens' logits at the answer position)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import ClassifierModel, Detector, LabeledSamples


class LossDetector(Detector):
    name = "loss"
    summary = "Cross-entropy of the training label at the early checkpoint (higher = more at risk)"
    paper = "Dentan, Buscaldi, Shabou & Vanier, ECAI 2025 (baseline)"

    @dataclass
    class Config(Detector.Config):
        pass

    def score(self, model: ClassifierModel, samples: LabeledSamples, shadows=None) -> torch.Tensor:
        logits = model.class_logits(samples).float()
        return torch.nn.functional.cross_entropy(logits, samples.labels.to(logits.device), reduction="none")


@hookimpl
def memeval_methods():
    return [LossDetector]
