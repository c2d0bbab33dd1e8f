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
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch = Batch.from_sequences(seqs[start : start + batch_size], model.pad_id, model.device)
        nll = token_nll(model.logits(batch), batch.input_ids)
        total += float((nll * batch.loss_mask).sum())
        count += int(batch.loss_mask.sum())
    return total / count
