"""The ``early_lira`` reference detector: local log-LiRA at the early checkpoint ("early memo" in Dentan
et al., ECAI 2025): the target's early logit gap against Gaussians fitted to the shadows' early logit gaps,
IN and OUT. It needs shadow models (``requires = ("shadows",)``), which no a-priori detector has; it marks
what the shadows' information is worth, not a competitor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import ClassifierModel, Detector, LabeledSamples, ShadowModels
from memeval.metrics import local_lira, logit_gap


class EarlyLiRA(Detector):
    name = "early_lira"
    summary = "Local log-LiRA on the logit gap at the early checkpoint (uses shadow models: a reference)"
    paper = "Dentan, Buscaldi, Shabou & Vanier, ECAI 2025 (early memorization); Carlini et al., S&P 2022"
    requires = ("shadows",)

    @dataclass
    class Config(Detector.Config):
        pass

    def score(self, model: ClassifierModel, samples: LabeledSamples, shadows: ShadowModels | None = None) -> torch.Tensor:
        if shadows is None:
            raise RuntimeError("early_lira needs the shadow models; the protocol gave none")
        labels = samples.labels
        target = logit_gap(model.class_logits(samples).cpu(), labels)
        others = torch.stack([logit_gap(m.class_logits(samples).cpu(), labels) for m in shadows.models])
        memo = local_lira(target, others, shadows.membership)
        return torch.nan_to_num(memo, nan=0.0).float()


@hookimpl
def memeval_methods():
    return [EarlyLiRA]
