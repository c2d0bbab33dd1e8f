"""Each predictor on a planted set whose answer is known: memorized sequences have a low loss, a low entropy, a
low zlib ratio, a hidden-state direction and (for the early checkpoint) matching source tokens, so every
predictor must separate them; the transformer's faithful mode mixes sequences of a batch (its defect), the
corrected one does not."""

from __future__ import annotations

import pytest
import torch
from memeval_methods.prediction_baselines import (
    EarlyCheckpoint,
    EntropyPredictor,
    LogisticProbe,
    LossThreshold,
    ZlibRatio,
)
from memeval_methods.transformer_predictor import TransformerPredictor

from memeval.api import PredictionExample
from memeval.metrics import exact_auc, token_auc

K, ELL, D = 4, 6, 16


def planted(n: int, seed: int) -> list[PredictionExample]:
    """Half of the sequences memorized (every token matches), half not (none does); features separate them."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(D)
    direction[0] = 3.0
    out = []
    for i in range(n):
        mem = i % 2 == 0
        m = torch.full((ELL,), mem)
        hidden = torch.randn(K + ELL - 1, D, generator=g)
        hidden[K - 1 :] += direction * (1.0 if mem else -1.0)
        low, high = torch.rand(ELL, generator=g) * 0.5, 1.0 + 2 * torch.rand(ELL, generator=g)
        feats = {"loss": low if mem else high, "entropy": low.clone() if mem else high.clone(),
                 "zlib": torch.tensor([0.3 if mem else 0.8]) + 0.05 * torch.rand(1, generator=g),
                 "hidden": hidden, "source_matches": m.float()}
        ids = tuple(torch.randint(3, 100, (K + ELL,), generator=g).tolist())
        out.append(PredictionExample(f"s{seed}-{i}", ids, K, feats, tuple(m.tolist())))
    return out


def unlabelled(examples: list[PredictionExample]) -> list[PredictionExample]:
    return [PredictionExample(e.id, e.input_ids, e.prefix_len, e.features, None) for e in examples]


def scores(method, train, val, test) -> tuple[float, float]:
    method.fit(train, val)
    preds = method.predict(unlabelled(test))
    labels = [torch.tensor(e.matches) for e in test]
    return token_auc([p.token_probs for p in preds], labels), exact_auc([p.score for p in preds], labels)


@pytest.mark.parametrize("cls", [LossThreshold, EntropyPredictor, ZlibRatio, LogisticProbe, EarlyCheckpoint])
def test_baselines_separate_a_planted_memorized_set(cls):
    tok, exact = scores(cls(), planted(40, 0), planted(10, 1), planted(20, 2))
    assert tok == 1.0 and exact == 1.0, (cls.name, tok, exact)


@pytest.mark.slow
def test_transformer_predictor_learns_a_planted_direction_and_is_seeded():
    train, val, test = planted(60, 0), planted(20, 1), planted(20, 2)
    tok, exact = scores(TransformerPredictor(TransformerPredictor.Config(epochs=8, batch_size=16, lr=1e-3, seed=3)),
                        train, val, test)
    assert tok > 0.95 and exact > 0.95, (tok, exact)
    a, b = (TransformerPredictor(TransformerPredictor.Config(epochs=1, batch_size=16, seed=3)) for _ in range(2))
    a.fit(train, val)
    b.fit(train, val)
    pa, pb = a.predict(unlabelled(test)), b.predict(unlabelled(test))
    assert all(torch.equal(x.token_probs, y.token_probs) for x, y in zip(pa, pb))


@pytest.mark.parametrize("faithful", [False, True])
def test_only_the_faithful_transformer_mixes_the_sequences_of_a_batch(faithful):
    """The reference feeds [batch, seq, d] to an encoder built with batch_first=False: attention then runs
    across the batch at each position, so a sequence's prediction depends on its batchmates."""
    cfg = TransformerPredictor.Config(epochs=1, batch_size=16, seed=0, faithful=faithful)
    method = TransformerPredictor(cfg)
    method.fit(planted(16, 0), planted(8, 1))
    test = unlabelled(planted(8, 2))
    alone = method.predict(test[:1])[0].token_probs
    together = method.predict(test)[0].token_probs
    assert torch.allclose(alone, together, atol=1e-5) is (not faithful)
    assert method.validation_is_test is faithful


def test_transformer_ffn_width_is_configurable_and_defaults_to_the_reference():
    assert TransformerPredictor.Config().ffn == 2048  # PyTorch's default, kept by the reference code
    method = TransformerPredictor(TransformerPredictor.Config(epochs=1, ffn=64))
    method.fit(planted(8, 0), planted(4, 1))
    assert {layer.linear1.out_features for layer in method.net.encoder.layers} == {64}
