"""Baseline memorization predictors (kind ``predictor``), each from one feature the protocol offers.

Every baseline gives token probabilities P(greedy token i reproduces the true token) and, as its sequence
score, the smallest of them (the sequence is predicted to be reproduced exactly when every token is).

- ``loss_threshold``: a logistic regression of the match label on the teacher-forced NLL of the true token
  (low loss: memorized; the classic membership signal, Yeom et al. 2018; Carlini et al. 2021);
- ``entropy``: the same on the entropy of the next-token distribution at each greedy step (Chen, Han & Miyao
  2024 §4.3: entropy falls at the boundary for memorized sequences);
- ``zlib_ratio``: the same on the zlib compression ratio of the sequence, one value for all its tokens
  (Carlini et al. 2021's zlib reference);
- ``logistic_probe``: a logistic regression on the hidden state that predicts each token, plus its entropy
  (a linear probe of the same inputs as Chen et al.'s transformer);
- ``early_checkpoint``: Biderman et al. (NeurIPS 2023): the earlier checkpoint's own greedy matches as the
  forecast (no fitting); offered on forecasting tasks only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memeval import hookimpl
from memeval.api import Prediction, PredictionExample, Predictor


def _token_rows(examples: list[PredictionExample], feature) -> np.ndarray:
    return np.concatenate([feature(e) for e in examples], axis=0)


def _labels(examples: list[PredictionExample]) -> np.ndarray:
    return np.concatenate([np.asarray(e.matches, dtype=np.int64) for e in examples])


class _LogisticOnFeature(Predictor):
    """A logistic regression of each token's match label on per-token features ``[ℓ, f]``."""

    @dataclass
    class Config(Predictor.Config):
        c: float = 1.0  # inverse regularisation strength (scikit-learn's C)

    def token_features(self, e: PredictionExample) -> np.ndarray:
        raise NotImplementedError

    def fit(self, train: list[PredictionExample], validation: list[PredictionExample]) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = _token_rows(train + validation, self.token_features)
        y = _labels(train + validation)
        if len(set(y.tolist())) < 2:  # one class only: predict its frequency
            self.model, self.constant = None, float(y.mean())
            return
        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=self.config.c, max_iter=2000,
                                                                         random_state=self.config.seed))
        self.model.fit(x, y)

    def predict(self, test: list[PredictionExample]) -> list[Prediction]:
        out = []
        for e in test:
            x = self.token_features(e)
            p = (self.model.predict_proba(x)[:, 1] if self.model is not None
                 else np.full(len(x), self.constant))
            probs = torch.tensor(p, dtype=torch.float32)
            out.append(Prediction(probs, float(probs.min())))
        return out


class LossThreshold(_LogisticOnFeature):
    name = "loss_threshold"
    summary = "Logistic regression of each token's match on its teacher-forced loss (low loss: memorized)"
    paper = "Yeom et al. 2018; Carlini et al. 2021 (USENIX Security)"
    features = ("loss",)

    def token_features(self, e):
        return e.features["loss"].numpy()[:, None]


class EntropyPredictor(_LogisticOnFeature):
    name = "entropy"
    summary = "Logistic regression of each token's match on the entropy at its greedy generation step"
    paper = "Chen, Han & Miyao 2024 (EMNLP), §4.3 entropy dynamics"
    features = ("entropy",)

    def token_features(self, e):
        return e.features["entropy"].numpy()[:, None]


class ZlibRatio(_LogisticOnFeature):
    name = "zlib_ratio"
    summary = "Logistic regression of each token's match on the sequence's zlib compression ratio"
    paper = "Carlini et al. 2021 (USENIX Security), zlib reference"
    features = ("zlib",)

    def token_features(self, e):
        return np.repeat(e.features["zlib"].numpy()[None, :], e.suffix_len, axis=0)


class LogisticProbe(_LogisticOnFeature):
    name = "logistic_probe"
    summary = "Logistic regression on the hidden state predicting each token, plus its entropy"
    paper = "a linear probe of Chen, Han & Miyao 2024's inputs"
    features = ("hidden", "entropy")

    def token_features(self, e):
        k, l = e.prefix_len, e.suffix_len
        hidden = e.features["hidden"][k - 1 : k - 1 + l].numpy()
        return np.concatenate([hidden, e.features["entropy"].numpy()[:, None]], axis=1)


class EarlyCheckpoint(Predictor):
    name = "early_checkpoint"
    summary = "The earlier checkpoint's own greedy matches as the forecast of the final model's (no fitting)"
    paper = "Biderman et al. 2023 (NeurIPS), 'Emergent and predictable memorization'"
    features = ("source_matches",)

    def predict(self, test: list[PredictionExample]) -> list[Prediction]:
        return [Prediction(e.features["source_matches"].float(), float(e.features["source_matches"].min()))
                for e in test]


@hookimpl
def memeval_methods():
    return [LossThreshold, EntropyPredictor, ZlibRatio, LogisticProbe, EarlyCheckpoint]
