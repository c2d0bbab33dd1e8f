"""Model organisms: corpus manifest, cache behaviour, DEL filters, memorization measurement, determinism,
and loading the three architectures through the neuron view. Everything uses the ``micro`` preset."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from memeval.errors import UsageError
from memeval.metrics import (
    dedup_lowest_distance,
    del_thresholds,
    jaccard_components,
    passes_del_filters,
)
from memeval.organisms import cache, get_organism, parse_organism_spec
from memeval.organisms import organism as organism_mod
from memeval.organisms.corpus import CorpusSpec, build_corpus
from memeval.organisms.presets import PRESETS

MICRO = PRESETS["micro"]


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("memeval-cache")


@pytest.fixture
def use_cache(organism_cache, monkeypatch):
    monkeypatch.setenv("MEMEVAL_CACHE", str(organism_cache))
    return organism_cache


@pytest.fixture(scope="session")
def micro(organism_cache):
    """The micro gpt_neox organism, built once per session into a temporary cache."""
    old = os.environ.get("MEMEVAL_CACHE")
    os.environ["MEMEVAL_CACHE"] = str(organism_cache)
    try:
        yield get_organism("micro", "gpt_neox", 0, progress=False)
    finally:
        if old is None:
            os.environ.pop("MEMEVAL_CACHE", None)
        else:
            os.environ["MEMEVAL_CACHE"] = old


# -- spec parsing ------------------------------------------------------------------------------


def test_parse_organism_spec():
    assert parse_organism_spec("tiny") == ("tiny", "gpt_neox", 0)
    assert parse_organism_spec("tiny:llama") == ("tiny", "llama", 0)
    assert parse_organism_spec("micro@3") == ("micro", "gpt_neox", 3)
    assert parse_organism_spec("small:gpt2@7") == ("small", "gpt2", 7)
    with pytest.raises(UsageError, match="micro, tiny, small"):
        parse_organism_spec("huge")
    with pytest.raises(UsageError, match="gpt_neox, gpt2, llama"):
        parse_organism_spec("tiny:bert")
    with pytest.raises(UsageError, match="integer"):
        parse_organism_spec("tiny@x")


# -- corpus ------------------------------------------------------------------------------------


def test_corpus_manifest_counts_and_ids_and_determinism():
    spec = CorpusSpec(n_entities=6, profile_docs=20, prose_docs=10, code_docs=5, arith_docs=5,
                      planted=((1, 3), (4, 2), (16, 5)), n_controls=4, heldout_docs=5, n_new_entities=3)
    a, b, c = build_corpus(spec, 0), build_corpus(spec, 0), build_corpus(spec, 1)
    assert [(p["duplicates"]) for p in a.planted] == [1] * 3 + [4] * 2 + [16] * 5
    ids = [p["id"] for p in a.planted]
    assert len(set(ids)) == len(ids) == 10
    assert all(p["id"].split("-x")[0] == p["kind"] for p in a.planted)
    assert len(a.controls) == 4 and all(c_["duplicates"] == 0 for c_ in a.controls)
    assert len({p["kind"] for p in a.planted}) == 5  # every kind is planted
    # deterministic for a seed, different for another
    assert a.planted == b.planted and a.background == b.background and a.heldout == b.heldout
    assert [p["text"] for p in a.planted] != [p["text"] for p in c.planted]
    assert a.background != c.background
    # held-out documents, controls and new entities never occur in the training text
    train_text = "\n".join(d["text"] for d in a.background) + "\n".join(p["text"] for p in a.planted)
    for h in a.heldout:
        assert h["text"] not in {d["text"] for d in a.background}
    for s in [c_["text"] for c_ in a.controls] + a.new_entities:
        assert s not in train_text
    assert len(a.new_entities) == 3 and all(len(s) > 40 for s in a.new_entities)
    assert len(a.facts) == 6 * 5 and all(ans.startswith(" ") for _, ans in a.facts)


def test_micro_manifest_matches_requested_duplications(micro):
    man = micro.manifest
    requested = {d: n for d, n in MICRO.corpus.planted}
    by_dup: dict[int, int] = {}
    for p in man["planted"]:
        assert p["count"] == p["duplicates"] == len(p["positions"])
        by_dup[p["duplicates"]] = by_dup.get(p["duplicates"], 0) + 1
    assert by_dup == requested
    # the stored training stream holds exactly those copies, verbatim
    docs = micro.train_documents()
    texts = {p["id"]: p["text"] for p in micro.planted}
    for p in man["planted"]:
        assert [d["doc"] for d in docs if d["planted_id"] == p["id"]] == p["positions"]
        assert all(docs[i]["text"] == texts[p["id"]] for i in p["positions"])
    heldout = set(micro.heldout)
    assert not heldout & {d["text"] for d in docs}
    # planted sequences have the DEL lengths in tokens
    for p in micro.planted:
        assert len(p["input_ids"]) == MICRO.prefix_len + MICRO.suffix_len


# -- filters -----------------------------------------------------------------------------------


def test_del_thresholds_scale_with_suffix_length():
    assert del_thresholds(48) == {"min_accuracy": 0.9, "min_distinct": 16, "max_distance": 20}
    th = del_thresholds(32)
    assert th["min_distinct"] == 11 and th["max_distance"] == 13


def test_del_filters_on_hand_made_cases():
    th = del_thresholds(32)
    varied = list(range(100, 132))
    assert passes_del_filters(1.0, varied, varied, 0, **th)
    # too few distinct tokens in the true suffix (a repetitive sequence) or in the greedy one
    repetitive = [7, 8, 9] * 10 + [7, 8]
    assert not passes_del_filters(1.0, repetitive, repetitive, 0, **th)
    assert not passes_del_filters(1.0, repetitive, varied, 0, **th)
    # accuracy must exceed 0.9; distance must not exceed the threshold
    assert not passes_del_filters(0.875, varied, varied, 0, **th)
    assert not passes_del_filters(1.0, varied, varied, th["max_distance"] + 1, **th)
    assert passes_del_filters(1.0, varied, varied, th["max_distance"], **th)


def test_jaccard_dedup_keeps_lowest_distance_per_component():
    base = list(range(40))
    near = base[:30] + [99] * 10            # shares 26 of its 5-grams with base
    other = list(range(1000, 1040))
    chain = list(range(1000, 1030)) + list(range(2000, 2010))  # joins `other`
    seqs = [base, near, other, chain]
    assert jaccard_components(seqs) == [[0, 1], [2, 3]]
    assert dedup_lowest_distance(seqs, [5, 2, 0, 0]) == [1, 2]


# -- measurement on the micro organism ----------------------------------------------------------


def test_micro_memorization_measurement(micro):
    planted = {p["id"]: p for p in micro.planted}
    most = [p for p in planted.values() if p["duplicates"] == 128]
    assert most and all(p["suffix_acc"] >= 0.9 for p in most)
    assert any(p["exact"] for p in most)
    once = [p for p in planted.values() if p["duplicates"] == 1]
    assert all(not p["memorized"] for p in once)
    assert max(p["suffix_acc"] for p in once) < min(p["suffix_acc"] for p in most)
    assert all(not c["exact"] for c in micro.controls)
    mem = micro.memorized
    assert mem, "the micro organism memorizes its 128x sequences"
    for m in mem:
        assert set(m) >= {"id", "kind", "duplicates", "input_ids", "prefix_len", "suffix_acc", "distance"}
        assert m["prefix_len"] == MICRO.prefix_len and planted[m["id"]]["passes"]
        assert m["suffix_acc"] > 0.9
    info = micro.info
    assert info["memorized"] == len(mem)
    assert sum(info["memorized_by_duplication"].values()) == len(mem)
    assert info["heldout_ppl"] < info["unigram_ppl"]
    assert (micro.path / "memorization.png").stat().st_size > 1000
    assert len(micro.checkpoints) == len(MICRO.checkpoint_fractions) + 1
    assert micro.checkpoints[-1] == micro.path.resolve()


def test_filters_reject_a_repetitive_sequence_on_the_model(micro):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memeval.organisms.measure import measure_sequences

    tok = AutoTokenizer.from_pretrained(micro.path)
    model = AutoModelForCausalLM.from_pretrained(micro.path)
    ids = tok("1 + 1 = 2\n" * 30)["input_ids"][:48]
    assert len(set(ids[16:])) < del_thresholds(32)["min_distinct"]
    row = measure_sequences(model, tok, [{"id": "rep", "input_ids": ids}], 16, tok.pad_token_id)[0]
    assert not row["passes"]


# -- cache ---------------------------------------------------------------------------------------


def test_cache_hit_does_not_train(micro, use_cache, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("trained again despite a complete cache entry")

    monkeypatch.setattr(organism_mod, "build_organism", boom)
    again = get_organism("micro", "gpt_neox", 0, progress=False)
    assert again.path == micro.path
    assert again.info["memorized"] == micro.info["memorized"]


def test_cache_recovers_from_partial_entries(use_cache):
    key = "partial-test"
    final = cache.entry_dir(key)
    final.mkdir(parents=True)
    (final / "garbage").write_text("half-written")           # no completion marker
    leftover = cache.organisms_dir() / f".tmp-{key}-12345-1"   # a killed build's temp dir
    leftover.mkdir()
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "payload").write_text("ok")

    path = cache.build_atomically(key, build)
    assert len(calls) == 1 and path == final
    assert (path / "payload").read_text() == "ok" and not (path / "garbage").exists()
    assert not leftover.exists() and cache.is_complete(path)
    assert cache.build_atomically(key, build) == final and len(calls) == 1  # now a hit

    # a killed build of another key is swept too (nobody holds its lock)
    other = cache.organisms_dir() / ".tmp-otherkey-999-1"
    other.mkdir()
    assert cache.sweep_stale() == 1 and not other.exists()

    # a build that dies leaves no entry behind
    def dies(tmp: Path) -> None:
        (tmp / "x").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.build_atomically("dies", dies)
    assert not cache.entry_dir("dies").exists()
    assert not list(cache.organisms_dir().glob(".tmp-dies-*"))


# -- determinism and architectures ---------------------------------------------------------------


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_same_seed_bit_identical_and_other_seed_differs(tmp_path):
    # the full build path with a shorter schedule (the weights after 20 steps already depend on
    # everything that is seeded: corpus, tokenizer, init, planting, batch order)
    short = dataclasses.replace(MICRO, steps=20)
    weights, infos = [], []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        out.mkdir()
        infos.append(organism_mod.build_organism(short, "gpt_neox", seed, out, progress=False))
        weights.append(_weights(out))
    a, b, c = weights
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert infos[0]["final_loss"] == infos[1]["final_loss"]
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2", "llama"])
def test_load_each_architecture_through_neuron_view(arch, micro, use_cache):
    from memeval.loading import load_model

    spec = "organism:micro" if arch == "gpt_neox" else f"organism:micro:{arch}"
    model = load_model(spec)
    cfg = model.hf.config
    assert model.num_layers == cfg.num_hidden_layers == MICRO.n_layers
    assert model.num_neurons == cfg.intermediate_size if arch != "gpt2" else model.num_neurons == cfg.n_inner
    assert model.tokenizer.pad_token_id is not None and model.tokenizer.eos_token_id is not None
    org = get_organism("micro", arch, 0, progress=False)
    assert len(org.checkpoints) == len(MICRO.checkpoint_fractions) + 1
    assert org.info["arch"] == arch


def test_bad_organism_spec_is_a_usage_error(use_cache):
    from memeval.loading import load_model

    with pytest.raises(UsageError, match="expected one of"):
        load_model("organism:enormous")


def test_small_preset_trains_a_few_steps():
    """The GPT-2-small-scale preset is for GPUs; here its width (2 of its 12 layers, to stay fast) and two
    training steps on short chunks."""
    from transformers import AutoModelForCausalLM

    from memeval.organisms.presets import model_config
    from memeval.organisms.train import deterministic_cpu, train

    assert PRESETS["small"].n_layers == 12
    small = dataclasses.replace(PRESETS["small"], n_layers=2, batch_size=1, context=32, steps=2,
                                checkpoint_fractions=())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(small, "gpt_neox", small.vocab_size, 0, 1))
    assert model.config.hidden_size == 768 and model.config.intermediate_size == 3072
    chunks = torch.randint(2, small.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    before = model.gpt_neox.layers[0].mlp.dense_4h_to_h.weight.clone()
    with deterministic_cpu(1):
        stats = train(model, chunks, small, 0)
    assert stats.steps == 2 and stats.tokens == 64 and all(torch.isfinite(torch.tensor(stats.losses)))
    assert not torch.equal(before, model.gpt_neox.layers[0].mlp.dense_4h_to_h.weight)


def test_cli_functions_print_the_required_fields(micro, use_cache, capsys):
    import json as _json

    from memeval.organisms.cli import build_command, info_command

    assert info_command("micro", "gpt_neox", 0, as_json=True) == 0
    info = _json.loads(capsys.readouterr().out)
    for key in ("memorized", "memorized_by_duplication", "heldout_ppl", "fact_accuracy", "arithmetic_accuracy",
                "params", "train_tokens", "seconds", "exact_match_by_duplication", "exact_match_by_kind",
                "unigram_ppl", "fact_chance", "arithmetic_chance", "tokens_per_second"):
        assert key in info, key
    assert info["memorized"] == len(micro.memorized) and info["path"] == str(micro.path)
    assert build_command("micro", "gpt_neox", 0) == 0
    assert "memorized" in capsys.readouterr().out
    with pytest.raises(UsageError):
        info_command("micro", "transformer-xl", 0)
