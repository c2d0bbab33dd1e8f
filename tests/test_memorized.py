"""memeval.memorized: MemPi's DEL filters with filters 2-3 on the free greedy generation, checked against a
plain (non-shortcut) greedy generation and the thresholds applied by hand; the organism's memorized set is
this definition's output."""

from __future__ import annotations

import pytest

from memeval.api import TokenSequence
from memeval.generation import greedy_continuations, teacher_forced_argmax
from memeval.metrics import del_thresholds, levenshtein
from memeval.memorized import decode, filter_counts, measure, memorized, select


@pytest.fixture(scope="module")
def micro(micro_organism):
    model = micro_organism.load()
    seqs = [TokenSequence(p["id"], tuple(p["input_ids"]), micro_organism.prefix_len) for p in micro_organism.planted]
    return micro_organism, model, seqs


def test_filters_run_on_the_plain_greedy_generation(micro):
    org, model, seqs = micro
    rows = measure(model, seqs, batch_size=16, generate_all=True)
    th = del_thresholds(org.suffix_len)
    gens = greedy_continuations(model, [s.input_ids[: s.prefix_len] for s in seqs], org.suffix_len, batch_size=1)
    tf = teacher_forced_argmax(model, seqs)
    differs = 0
    for s, row, gen, arg in zip(seqs, rows, gens, tf):
        prefix, suffix = list(s.input_ids[: s.prefix_len]), list(s.input_ids[s.prefix_len:])
        dist = levenshtein(decode(model.tokenizer, prefix + gen), decode(model.tokenizer, s.input_ids))
        assert row["greedy"] == gen
        assert row["distance"] == dist
        assert row["distinct_greedy"] == len(set(gen))
        assert row["exact"] == (gen == suffix)
        acc = sum(a == b for a, b in zip(arg, suffix)) / len(suffix)
        assert row["suffix_acc"] == pytest.approx(acc)
        expected = (acc > th["min_accuracy"] and len(set(gen)) >= th["min_distinct"]
                    and len(set(suffix)) >= th["min_distinct"] and dist <= th["max_distance"])
        assert row["passes"] == expected
        differs += arg != gen
    assert any(r["passes"] for r in rows) and not all(r["passes"] for r in rows)
    # the organism stores exactly this definition's memorized set
    keep = select(seqs, rows)
    assert sorted(seqs[i].id for i in keep) == sorted(m["id"] for m in org.memorized)


def test_generation_only_for_sequences_passing_filter_1(micro):
    org, model, seqs = micro
    full = measure(model, seqs, batch_size=16, generate_all=True)
    lazy_keep, lazy = memorized(model, seqs, batch_size=7)
    assert lazy_keep == select(seqs, full)
    for a, b in zip(full, lazy):
        if b["failed"] == "accuracy":
            assert b["greedy"] is None and b["distance"] is None
        else:
            assert (a["greedy"], a["distance"]) == (b["greedy"], b["distance"])
    counts = filter_counts(lazy)
    assert counts["kept"] == len(lazy_keep)
    assert sum(counts.values()) == len(seqs)
