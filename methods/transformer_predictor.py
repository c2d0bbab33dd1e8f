"""Chen, Han & Miyao (EMNLP 2024, §5): a Transformer over the LLM's hidden states and generation entropies that
predicts, for each continuation token, whether greedy decoding reproduces it (mynlp/memorizationstudy).

Model: ``nn.TransformerEncoder`` (4 layers, 8 heads, d_model = the LLM's hidden size, PyTorch's defaults:
FFN 2048, dropout 0.1, no positional encoding) over the hidden states of the context and the greedy
continuation; Linear(d → 512) and ReLU; the positions that predict continuation tokens (k−1 … k+ℓ−2) keep
their 512 features, the step's entropy is appended, and Linear(513 → 2) with log-softmax gives the token's
P(match); NLL per token. Adam, lr 1e-4, batch 128, at most 30 epochs, stop after 5 epochs without a better
validation token accuracy, keep the best epoch. Sequence score: the smallest token probability.

Corrected by default: the encoder is ``batch_first=True`` and the epoch is selected on the validation split,
seeded. ``faithful: true`` reproduces the reference code: the encoder keeps PyTorch's default
``batch_first=False`` while being fed ``[batch, seq, d]`` (self-attention then mixes different sequences at
the same position), and the epoch is selected on the test split (the protocol hands the labelled test split
as validation and marks the results ``selected_on_test``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from memeval import hookimpl
from memeval.api import Prediction, PredictionExample, Predictor


class PredictorNet(nn.Module):
    def __init__(self, d: int, heads: int, layers: int, batch_first: bool, ffn: int = 2048) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=ffn, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(d, 512)
        self.out = nn.Linear(513, 2)

    def forward(self, hidden: torch.Tensor, entropy: torch.Tensor, k: int) -> torch.Tensor:
        """``hidden`` [B, k+ℓ−1, d] (always batch-first here; with ``batch_first=False`` the encoder reads it
        as [seq, batch, d], the reference's defect), ``entropy`` [B, ℓ] → log-probabilities [B, ℓ, 2]."""
        x = torch.relu(self.proj(self.encoder(hidden)))
        x = x[:, k - 1 : k - 1 + entropy.shape[1]]
        return torch.log_softmax(self.out(torch.cat([x, entropy[..., None]], dim=-1)), dim=-1)


def _stack(examples: list[PredictionExample]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([e.features["hidden"].float() for e in examples]),
            torch.stack([e.features["entropy"].float() for e in examples]))


class TransformerPredictor(Predictor):
    name = "transformer_predictor"
    summary = "Transformer over hidden states and generation entropies predicting each token's greedy match"
    paper = "Chen, Han & Miyao 2024 (EMNLP), arXiv 2405.11577, §5"
    features = ("hidden", "entropy")

    @dataclass
    class Config(Predictor.Config):
        lr: float = 1e-4
        batch_size: int = 128
        epochs: int = 30
        patience: int = 5  # epochs without a better validation token accuracy before stopping
        layers: int = 4
        heads: int = 8
        ffn: int = 2048  # the encoder's feed-forward width (the reference keeps PyTorch's default, 2048)
        faithful: bool = False  # true: batch_first=False on batch-first input, and selection on the test split

    @property
    def validation_is_test(self) -> bool:
        return self.config.faithful

    def fit(self, train: list[PredictionExample], validation: list[PredictionExample]) -> None:
        cfg = self.config
        if len({(e.prefix_len, e.suffix_len) for e in train + validation}) != 1:
            raise ValueError("transformer_predictor needs one context and continuation length for all sequences")
        self.k = train[0].prefix_len
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # parameter initialisation and dropout
        h, ent = _stack(train)
        y = torch.tensor([e.matches for e in train], dtype=torch.long)
        vh, vent = _stack(validation)
        vy = torch.tensor([e.matches for e in validation], dtype=torch.long)
        heads = cfg.heads if h.shape[-1] % cfg.heads == 0 else 1
        self.net = PredictorNet(h.shape[-1], heads, cfg.layers, batch_first=not cfg.faithful, ffn=cfg.ffn)
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        best, best_state, stale = -1.0, None, 0
        for _ in range(cfg.epochs):
            self.net.train()
            for idx in torch.randperm(len(h), generator=gen).split(cfg.batch_size):
                logp = self.net(h[idx], ent[idx], self.k)
                loss = nn.functional.nll_loss(logp.reshape(-1, 2), y[idx].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            acc = float((self._logp(vh, vent).argmax(-1) == vy).float().mean())
            if acc > best:
                best, best_state, stale = acc, copy.deepcopy(self.net.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        self.net.load_state_dict(best_state)

    @torch.no_grad()
    def _logp(self, h: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return torch.cat([self.net(h[i : i + 256], ent[i : i + 256], self.k) for i in range(0, len(h), 256)])

    def predict(self, test: list[PredictionExample]) -> list[Prediction]:
        h, ent = _stack(test)
        probs = self._logp(h, ent)[..., 1].exp()
        return [Prediction(p, float(p.min())) for p in probs]


@hookimpl
def memeval_methods():
    return [TransformerPredictor]
