"""Measurements of a model on sequences, shared by protocols: teacher-forced suffix accuracy, character
distance of the teacher-forced continuation, and token-weighted perplexity. All batched, no gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memeval.api import Batch, TokenSequence
from memeval.metrics import greedy_tokens, levenshtein, masked_mean, token_correct, token_nll
from memeval.models import NeuronModel


@dataclass
class SuffixStats:
    acc: list[float]  # teacher-forced argmax accuracy over the suffix, per sequence
    dist: list[int]  # character Levenshtein: decoded (prefix + teacher-forced predictions) vs reference


@torch.no_grad()
def suffix_stats(model: NeuronModel, seqs: list[TokenSequence], batch_size: int = 64) -> SuffixStats:
    """MemPi's DEL measures (Chang et al. 2024 §4): Acc and Dist of each sequence's suffix."""
    acc: list[float] = []
    dist: list[int] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        batch = Batch.from_sequences(chunk, model.pad_id, model.device)
        logits = model.logits(batch)
        acc.extend(masked_mean(token_correct(logits, batch.input_ids), batch.loss_mask).tolist())
        predicted = greedy_tokens(logits, batch.input_ids).tolist()
        for row, seq in enumerate(chunk):
            n, p = len(seq.input_ids), seq.prefix_len
            guess = model.tokenizer.decode(list(seq.input_ids[:p]) + predicted[row][p:n])
            dist.append(levenshtein(guess, model.tokenizer.decode(list(seq.input_ids))))
    return SuffixStats(acc, dist)


@torch.no_grad()
def mean_token_nll(model: NeuronModel, seqs: list[TokenSequence], batch_size: int = 32) -> float:
    """Mean NLL (nats) over every scored token of every sequence (token-weighted, as perplexity needs)."""
    total, count = _nll_sums(model, seqs, batch_size)
    return total / count


def chunk_token_nlls(model: NeuronModel, seqs: list[TokenSequence], chunk: int = 16) -> list[float]:
    """The token-weighted mean NLL of each chunk of ``chunk`` consecutive sequences (MemPi's Rand-PPL batches)."""
    out = []
    for start in range(0, len(seqs), chunk):
        total, count = _nll_sums(model, seqs[start : start + chunk], chunk)
        out.append(total / count)
    return out


def _nll_sums(model: NeuronModel, seqs: list[TokenSequence], batch_size: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch = Batch.from_sequences(seqs[start : start + batch_size], model.pad_id, model.device)
        nll = token_nll(model.logits(batch), batch.input_ids)
        total += float((nll * batch.loss_mask).sum())
        count += int(batch.loss_mask.sum())
    return total, count


class SampleLog:
    """``--log-samples``: per sequence its prefix, true suffix and the model's greedy continuation before and
    after an edit, decoded, so a reader sees what was forgotten. ``before`` is generated once per sequence."""

    def __init__(self, model: NeuronModel) -> None:
        self.model = model
        self._before: dict[str, str] = {}

    def continuations(self, model: NeuronModel, seqs: list[TokenSequence]) -> dict[str, str]:
        """The decoded greedy continuation (suffix length) of each sequence's prefix under ``model``."""
        from memeval.generation import greedy_match
        from memeval.memorized import decode

        return {s.id: decode(model.tokenizer, m.continuation) for s, m in zip(seqs, greedy_match(model, seqs))}

    def rows(self, seqs: list[TokenSequence], after: dict[str, dict[str, str]]) -> list[dict[str, str]]:
        """One record per sequence: ``{"id", "prefix", "suffix", "before", <label>: continuation...}`` where
        ``after`` maps a label (``after@0.05``) to the continuations generated under that edit."""
        from memeval.memorized import decode

        missing = [s for s in seqs if s.id not in self._before]
        if missing:
            self._before.update(self.continuations(self.model, missing))
        tok = self.model.tokenizer
        return [{"id": s.id, "prefix": decode(tok, s.input_ids[: s.prefix_len]),
                 "suffix": decode(tok, s.input_ids[s.prefix_len:]), "before": self._before[s.id],
                 **{label: texts[s.id] for label, texts in after.items()}} for s in seqs]
