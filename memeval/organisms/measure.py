"""Measurement of a trained organism: which planted sequences are memorized (the DEL filters of MemPi §4,
adapted to the organism's prefix/suffix lengths; the one definition is :mod:`memeval.memorized`, filters 2
and 3 on the free greedy generation), held-out perplexity against a unigram baseline, and fact /
arithmetic probe accuracy against chance.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import torch

from memeval.api import TokenSequence
from memeval.metrics import dedup_lowest_distance, greedy_tokens, perplexity, token_correct, token_nll


@torch.no_grad()
def teacher_forced(model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> list[dict[str, Any]]:
    """One teacher-forced pass per batch (right padding): per sequence its ``correct`` flags, ``greedy``
    ids and ``nll`` (nats), each a list aligned with the tokens (entry 0 has no prediction)."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            attn[r, : len(s)] = 1
        ids, attn = ids.to(device), attn.to(device)
        logits = model(input_ids=ids, attention_mask=attn).logits
        correct, greedy, nll = token_correct(logits, ids), greedy_tokens(logits, ids), token_nll(logits, ids)
        for r, s in enumerate(chunk):
            n = len(s)
            out.append({"correct": correct[r, :n].tolist(), "greedy": greedy[r, :n].tolist(),
                        "nll": nll[r, :n].tolist()})
    return out


def measure_sequences(model, tokenizer, items: list[dict[str, Any]], prefix_len: int, pad_id: int,
                      batch_size: int = 64) -> list[dict[str, Any]]:
    """Add the DEL statistics of :func:`memeval.memorized.measure` to each item (which has ``input_ids``):
    ``suffix_acc``, ``exact``, ``distance`` (characters, decoded prefix + free greedy generation vs
    reference), ``distinct_true`` / ``distinct_greedy`` (of the greedy generation), ``suffix_nll`` and
    ``passes`` (filters 1-3). Every item is generated (``generate_all``), so each has a distance."""
    from memeval.memorized import measure
    from memeval.models import NeuronModel

    if not items:
        return []
    seqs = [TokenSequence(str(it["id"]), tuple(it["input_ids"]), prefix_len) for it in items]
    stats = measure(NeuronModel(model, tokenizer), seqs, batch_size, generate_all=True)
    out = []
    for it, st in zip(items, stats):
        row = dict(it)
        row.update(prefix_len=prefix_len, **{k: st[k] for k in ("suffix_acc", "exact", "distance", "distinct_true",
                                                                  "distinct_greedy", "suffix_nll", "passes")})
        out.append(row)
    return out


def select_memorized(measured: list[dict[str, Any]], n: int = 5, threshold: float = 0.05) -> list[dict[str, Any]]:
    """Filter 4 (dedup by n-gram Jaccard, keep the lowest distance) over the items passing filters 1-3."""
    passing = [m for m in measured if m["passes"]]
    keep = dedup_lowest_distance([m["input_ids"] for m in passing], [m["distance"] for m in passing], n, threshold)
    return [passing[i] for i in keep]


@torch.no_grad()
def heldout_nll(model, docs: list[list[int]], eos_id: int, context: int, pad_id: int, batch_size: int = 32) -> float:
    """Mean next-token NLL (nats) over held-out documents, each prefixed with eos and cut to ``context``."""
    seqs = []
    for d in docs:
        toks = [eos_id, *d, eos_id]
        for s in range(0, len(toks) - 1, context - 1):
            piece = toks[s : s + context]
            if len(piece) > 1:
                seqs.append(piece)
    total, count = 0.0, 0
    for res, s in zip(teacher_forced(model, seqs, pad_id, batch_size), seqs):
        total += sum(res["nll"][1:])
        count += len(s) - 1
    return total / count


def unigram_nll(train_docs: list[list[int]], heldout_docs: list[list[int]], eos_id: int, vocab_size: int) -> float:
    """Mean NLL of the held-out tokens (as scored by :func:`heldout_nll`) under an add-one unigram model
    fitted on the training tokens."""
    counts = Counter(t for d in train_docs for t in (*d, eos_id))
    total = sum(counts.values()) + vocab_size
    nll, n = 0.0, 0
    for d in heldout_docs:
        for t in (*d, eos_id):
            nll -= math.log((counts.get(t, 0) + 1) / total)
            n += 1
    return nll / n


def probe_accuracy(model, tokenizer, pairs: list[tuple[str, str]], pad_id: int, batch_size: int = 64) -> dict[str, Any]:
    """Greedy accuracy on (prompt, answer) probes: ``first`` = first answer token is the argmax,
    ``full`` = every answer token is (greedy decoding reproduces the whole answer)."""
    seqs, starts = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + answer)["input_ids"]
        # the answer begins with a space, so byte-level pre-tokenization keeps the prompt's tokens
        k = len(p) if full[: len(p)] == p else next(i for i, (a, b) in enumerate(zip(p, full)) if a != b)
        seqs.append(full)
        starts.append(k)
    res = teacher_forced(model, seqs, pad_id, batch_size)
    first = [r["correct"][k] for r, k in zip(res, starts)]
    full = [all(r["correct"][k:]) for r, k in zip(res, starts)]
    return {"first": sum(first) / len(first), "full": sum(full) / len(full), "per_item": full}


def rate_by(rows: list[dict[str, Any]], key: str, flag: str = "exact") -> dict[str, float]:
    """Mean of boolean ``flag`` grouped by ``key`` (keys as strings, numerically sorted when possible)."""
    groups: dict[Any, list[bool]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(bool(r[flag]))
    keys = sorted(groups, key=lambda k: (isinstance(k, str), k))
    return {str(k): sum(groups[k]) / len(groups[k]) for k in keys}


def count_by(rows: list[dict[str, Any]], key: str) -> dict[str, int]:
    c = Counter(r[key] for r in rows)
    return {str(k): c[k] for k in sorted(c, key=lambda k: (isinstance(k, str), k))}


def heldout_ppl(nll: float) -> float:
    return perplexity(nll)
