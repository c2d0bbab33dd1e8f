"""The ``logit_gap`` detector: −(z_y − max_{y'≠y} z_{y'}) at the early checkpoint (a small or negative
margin of the training label = likely memorized later). Dentan et al., ECAI 2025, baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import ClassifierModel, Detector, LabeledSamples
from memeval.metrics import logit_gap


class LogitGapDetector(Detector):
    name = "logit_gap"
    summary = "Negative logit gap of the training label at the early checkpoint"
    paper = "Dentan, Buscaldi, Shabou & Vanier, ECAI 2025 (baseline)"

    @dataclass
    class Config(Detector.Config):
        pass

    def score(self, model: ClassifierModel, samples: LabeledSamples, shadows=None) -> torch.Tensor:
        logits = model.class_logits(samples)
        return -logit_gap(logits, samples.labels.to(logits.device))


@hookimpl
def memeval_methods():
    return [LogitGapDetector]
