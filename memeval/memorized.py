"""Which sequences a model memorized: MemPi's DEL filters (Chang et al. NAACL 2024, §4;
``terarachang/MemPi`` ``find_memorized_data.py``), the one definition memeval uses for organisms and for
users' files.

A sequence is a prefix of k tokens and a true suffix of ℓ tokens. It is **memorized** when

1. its teacher-forced suffix accuracy (fraction of suffix tokens that are the argmax given the true
   context) is above 0.9;
2. the *greedy generation* x_1..x_ℓ from the prefix and the true suffix both have at least 16 distinct
   tokens (of ℓ = 48);
3. the character Levenshtein distance between the decoded prefix + greedy generation and the decoded
   prefix + true suffix is at most 20 (for ℓ = 48);
4. it survives the 5-gram dedup: sequences whose 5-gram Jaccard similarity exceeds 0.05 form connected
   components, and only the lowest-distance member of each is kept.

Filters 2 and 3 run on the free greedy generation, as MemPi's code does (not on the teacher-forced argmax,
which overstates a sequence after its first error). The thresholds of 2 and 3 scale linearly with ℓ
(:func:`memeval.metrics.del_thresholds`). Greedy generation is :func:`memeval.generation.greedy_match`;
it runs only for sequences that pass filter 1 unless ``generate_all`` is set, since a generation cannot
change filter 1's verdict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from memeval.api import Batch, TokenSequence
from memeval.generation import greedy_match
from memeval.metrics import (dedup_lowest_distance, del_thresholds, distinct_count, levenshtein, token_correct,
                             token_nll)

if TYPE_CHECKING:
    from memeval.models import NeuronModel

#: the filter each rejected sequence failed first, in MemPi's order (``None``: passed filters 1-3)
FILTERS = ("accuracy", "distinct", "distance", "dedup")


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decoded text for the distance filter (special tokens skipped, as MemPi's ``batch_decode``)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


@torch.no_grad()
def teacher_forced_stats(model: "NeuronModel", sequences: Sequence[TokenSequence],
                         batch_size: int = 32) -> list[tuple[float, float]]:
    """Per sequence, (teacher-forced suffix accuracy, mean suffix NLL in nats), one forward pass per batch."""
    out: list[tuple[float, float]] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        batch = Batch.from_sequences(chunk, model.pad_id, model.device)
        logits = model.logits(batch)
        correct, nll = token_correct(logits, batch.input_ids), token_nll(logits, batch.input_ids)
        mask = batch.loss_mask
        n = mask.sum(1).clamp(min=1)
        acc = ((correct & mask).sum(1) / n).tolist()
        mean_nll = ((nll * mask).sum(1) / n).tolist()
        out.extend(zip(acc, mean_nll))
    return out


def measure(model: "NeuronModel", sequences: Sequence[TokenSequence], batch_size: int = 32,
            generate_all: bool = False, on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Filters 1-3 for each sequence. Per sequence a dict with ``suffix_acc``, ``suffix_nll``, ``exact``
    (greedy generation = true suffix), ``distinct_true``, ``distinct_greedy``, ``distance`` (characters),
    ``greedy`` (the generated suffix ids), ``passes`` (filters 1-3) and ``failed`` (first filter failed or
    None). Sequences failing filter 1 have no generation (``greedy``, ``distance``, ``distinct_greedy`` are
    None) unless ``generate_all``. ``on_batch(n)`` is called after each batch of n sequences (progress)."""
    tok = model.tokenizer
    rows: list[dict[str, Any]] = []
    for start in range(0, len(sequences), batch_size):
        chunk = list(sequences[start : start + batch_size])
        stats = teacher_forced_stats(model, chunk, batch_size)
        th = [del_thresholds(len(s.input_ids) - s.prefix_len) for s in chunk]
        need = [i for i, ((acc, _), t) in enumerate(zip(stats, th)) if generate_all or acc > t["min_accuracy"]]
        gens = dict(zip(need, greedy_match(model, [chunk[i] for i in need], batch_size))) if need else {}
        for i, (s, (acc, nll), t) in enumerate(zip(chunk, stats, th)):
            true_suffix = list(s.input_ids[s.prefix_len:])
            row: dict[str, Any] = {"suffix_acc": acc, "suffix_nll": nll, "distinct_true": distinct_count(true_suffix),
                                   "greedy": None, "distinct_greedy": None, "distance": None, "exact": False}
            g = gens.get(i)
            if g is not None:
                prefix = list(s.input_ids[: s.prefix_len])
                row.update(greedy=list(g.continuation), distinct_greedy=distinct_count(g.continuation),
                           exact=g.exact,
                           distance=levenshtein(decode(tok, prefix + list(g.continuation)), decode(tok, s.input_ids)))
            if not acc > t["min_accuracy"]:
                failed = "accuracy"
            elif min(row["distinct_greedy"], row["distinct_true"]) < t["min_distinct"]:
                failed = "distinct"
            elif row["distance"] > t["max_distance"]:
                failed = "distance"
            else:
                failed = None
            row.update(passes=failed is None, failed=failed)
            rows.append(row)
        if on_batch is not None:
            on_batch(len(chunk))
    return rows


def select(sequences: Sequence[TokenSequence], measured: Sequence[dict[str, Any]], n: int = 5,
           threshold: float = 0.05) -> list[int]:
    """Filter 4 over the sequences passing filters 1-3: indices (into ``sequences``) of the kept ones, in
    increasing order. Rows that pass 1-3 but lose the dedup get ``failed = "dedup"``."""
    passing = [i for i, m in enumerate(measured) if m["passes"]]
    keep = {passing[j] for j in dedup_lowest_distance([sequences[i].input_ids for i in passing],
                                                      [measured[i]["distance"] for i in passing], n, threshold)}
    for i in passing:
        if i not in keep:
            measured[i]["failed"] = "dedup"
    return sorted(keep)


def memorized(model: "NeuronModel", sequences: Sequence[TokenSequence], batch_size: int = 32,
              on_batch: Callable[[int], None] | None = None) -> tuple[list[int], list[dict[str, Any]]]:
    """All four filters: (indices of the memorized sequences, per-sequence measurements)."""
    measured = measure(model, sequences, batch_size, on_batch=on_batch)
    return select(sequences, measured), measured


def filter_counts(measured: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many sequences each filter removed (first failure), and how many are kept."""
    counts = {f"failed_{f}": sum(1 for m in measured if m["failed"] == f) for f in FILTERS}
    counts["kept"] = sum(1 for m in measured if m["passes"] and m["failed"] is None)
    return counts
