"""The specificity protocol, its metrics (hand-computed) and the localize_then_ablate adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from memeval import hookimpl
from memeval.adapters import localize_then_ablate, neurons_per_layer
from memeval.api import Batch, Editor, Localizer, SequenceSet, TokenSequence
from memeval.cli import main
from memeval.metrics import (forget_collateral_auc, loose_match, ndcg_at_k, suffix_exact_match)
from memeval.loading import load_model
from memeval.testing import write_memorized_jsonl

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Metrics against hand-computed values


def test_ndcg_at_k_hand_computed():
    ref = torch.tensor([[1, 2, 3]])
    assert float(ndcg_at_k(ref, ref)[0]) == pytest.approx(1.0)
    assert float(ndcg_at_k(torch.tensor([[7, 8, 9]]), ref)[0]) == 0.0
    # edited list [2, 1, 9]: gains 2, 3, 0 (reference ranks 1..3 are worth 3, 2, 1)
    dcg = 2 / math.log2(2) + 3 / math.log2(3) + 0
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert float(ndcg_at_k(torch.tensor([[2, 1, 9]]), ref)[0]) == pytest.approx(dcg / idcg)
    assert dcg / idcg == pytest.approx(0.81750, abs=1e-4)
    # k = 10, the reference's top-10 reversed
    ref10 = torch.arange(10)[None]
    rev = ref10.flip(-1)
    disc = [1 / math.log2(i + 2) for i in range(10)]
    expected = sum((i + 1) * disc[i] for i in range(10)) / sum((10 - i) * disc[i] for i in range(10))
    assert float(ndcg_at_k(rev, ref10)[0]) == pytest.approx(expected)


def test_forget_collateral_auc_is_the_staircase_the_readme_defines():
    """f(x) = the most forgetting any tried budget reached with collateral ≤ x (a step function); the
    trapezoids an earlier version integrated give 0.875, 0.417 and 0.60 on the first three cases."""
    assert forget_collateral_auc([(0.1, 0.5), (0.3, 1.0)], 1.0) == pytest.approx(0.2 * 0.5 + 0.7 * 1.0)  # 0.8
    # nothing was measured inside the bound: no credit for a budget beyond it
    assert forget_collateral_auc([(0.6, 1.0)], 0.5) == 0.0
    assert forget_collateral_auc([(1.0, 1.0)], 0.5) == 0.0
    # f = 0 below the only point, 1 from it to the bound: 0.1 / 0.5
    assert forget_collateral_auc([(0.4, 1.0)], 0.5) == pytest.approx(0.2)
    assert forget_collateral_auc([], 0.5) == 0.0
    assert forget_collateral_auc([(0.2, 0.0), (0.6, 0.0)], 0.5) == 0.0
    # a later, worse point does not lower the curve: 0.1·0.8 + 0.8·0.8 over [0, 1]
    assert forget_collateral_auc([(0.1, 0.8), (0.2, 0.4)], 1.0) == pytest.approx(0.1 * 0.8 + 0.8 * 0.8)
    # negative collateral counts as none; drops are clipped to [0, 1]
    assert forget_collateral_auc([(-0.1, 1.0)], 0.5) == pytest.approx(1.0)
    assert forget_collateral_auc([(0.25, 1.7)], 0.5) == pytest.approx(0.25 / 0.5)
    assert forget_collateral_auc([(0.0, -0.2)], 0.5) == 0.0


def test_loose_match_and_exact_match_hand_computed():
    assert loose_match((1, 2, 3, 4), (1, 2, 3, 9))  # token Levenshtein 1 of 4: exactly 0.75
    assert not loose_match((1, 2, 3, 4), (1, 2, 9, 9))  # 0.5
    assert not loose_match((5, 1, 2, 3), (1, 2, 3, 4))  # one token inserted, one dropped: d = 2, 0.5
    assert loose_match((5, 1, 2, 3), (1, 2, 3, 4), threshold=0.5)  # (position-wise accuracy would be 0)
    assert loose_match((), ())
    correct = torch.tensor([[False, True, True, False], [False, True, False, True], [False, False, False, False]])
    mask = torch.tensor([[False, True, True, False], [False, True, True, True], [False, False, False, False]])
    assert suffix_exact_match(correct, mask).tolist() == [True, False, False]


# ---------------------------------------------------------------------------------------------
# The adapter


class FixedNeurons(Localizer):
    """Scores neurons 0..9 of every layer highest, in decreasing order."""

    name = "fixed_spec"
    summary = "test localizer"
    calls = 0

    def localize(self, model, batch):
        FixedNeurons.calls += 1
        scores = torch.zeros(len(batch), model.num_layers, model.num_neurons, device=model.device)
        scores[:, :, :10] = torch.arange(10, 0, -1, device=model.device, dtype=torch.float32)
        return scores


def test_localize_then_ablate_zeroes_the_top_columns_of_a_copy(tiny_model_dir):
    model = load_model(str(tiny_model_dir("llama")), "cpu")
    fp = model.fingerprint()
    seqs = [TokenSequence(f"s{i}", tuple(range(1 + i, 13 + i)), 4) for i in range(3)]
    forget = SequenceSet(seqs, model.pad_id)
    FixedNeurons.calls = 0
    editor = localize_then_ablate(FixedNeurons(), skip_layers=[0], batch_size=2)
    assert neurons_per_layer(model.num_neurons, 0.05) == 4  # int(80 · 0.05)
    edited = editor.edit(model, forget, None, 0.05)
    assert edited is not model and model.fingerprint() == fp
    assert torch.equal(edited.down_proj(0), model.down_proj(0))  # layer 0 skipped
    w = edited.down_proj(1)
    assert (w[:, :4] == 0).all() and torch.equal(w[:, 4:], model.down_proj(1)[:, 4:])
    # the edit equals ablating those neurons at run time
    batch = Batch.from_sequences(seqs, model.pad_id, "cpu")
    with torch.no_grad(), model.ablate({1: torch.arange(4)}):
        expected = model.logits(batch)
    with torch.no_grad():
        assert torch.allclose(edited.logits(batch), expected, atol=1e-5)
    calls = FixedNeurons.calls
    editor.edit(model, forget, None, 0.125)  # a second budget on the same set reuses the scores
    assert FixedNeurons.calls == calls == 2  # two batches of the forget set, localized once


# ---------------------------------------------------------------------------------------------
# The protocol end to end on a tiny model with file data


class Identity(Editor):
    name = "identity_editor"
    summary = "returns an unchanged copy"

    def edit(self, model, forget, retain, budget):
        return model.clone()


class ZeroLayer(Editor):
    """Zeroes every neuron of layer 1 whatever the budget; records what it was given."""

    name = "zero_layer_editor"
    summary = "zero layer 1"
    seen: list = []

    def edit(self, model, forget, retain, budget):
        ZeroLayer.seen.append((len(forget), len(retain), budget))
        edited = model.clone()
        edited.set_down_proj(1, torch.zeros_like(edited.down_proj(1)))
        return edited


class Plugin:
    @hookimpl
    def memeval_methods(self):
        return [Identity, ZeroLayer, FixedNeurons]


@pytest.fixture
def spec_env(memeval_plugin, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMEVAL_LOAD_PLUGINS", "")
    memeval_plugin(Plugin(), "specificity-test-methods")
    model_dir = tiny_model_dir("gpt2")
    gen = torch.Generator().manual_seed(0)
    mem = tmp_path / "memorized.jsonl"
    write_memorized_jsonl(mem, 8, gen)
    torch.save(torch.randint(1, 120, (6, 20), generator=gen), tmp_path / "heldout.pt")
    torch.save(torch.randint(1, 120, (5, 20), generator=gen), tmp_path / "retain.pt")
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompt": f"alpha {w}", "answer": " river stone"}) + "\n"
                             for w in ("beta", "gamma", "delta")))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "spec.yaml").write_text(
        f"task: spec_tiny\nversion: 1\nprotocol: specificity\nmodel: {model_dir}\n"
        f"data: {{source: file, path: {mem}, ppl_path: {tmp_path / 'heldout.pt'}, retain_path: {tmp_path / 'retain.pt'}, "
        f"facts_path: {facts}, others: 3, ppl_sequences: 6, retain_sequences: 5}}\n"
        "params: {budgets: [0.05, 0.125], set_size: 3, sets: 2}\n")
    return model_dir, tmp_path


def _run(tmp: Path, methods: str, *extra: str) -> dict:
    code = main(["--methods", methods, "--tasks", "spec_tiny", "--include-path", str(tmp / "tasks"),
                 "--output", str(tmp / "out"), "--device", "cpu", *extra])
    assert code == 0
    return {(r["method"], r["item"]): r for r in map(json.loads, (tmp / "out" / "results.jsonl").read_text().splitlines())}


def test_specificity_identity_editor_changes_nothing(spec_env):
    _, tmp = spec_env
    recs = _run(tmp, "identity_editor", "--log-samples")
    assert len(recs) == 2
    logged = [json.loads(l) for l in (tmp / "out" / "samples" / "identity_editor__spec_tiny.jsonl").open()]
    assert sorted(r["item"] for r in logged) == ["set0", "set1"]
    for row in logged:
        assert len(row["samples"]) == 3  # the forget set
        for sample in row["samples"]:  # an edit that changes nothing generates what the model generated before
            assert sample["after@0.05"] == sample["after@0.125"] == sample["before"]
    for rec in recs.values():
        m = rec["metrics"]
        for b in ("0.05", "0.125"):
            assert m[f"forget_em_drop@budget={b}"] == 0.0
            assert m[f"heldout_ppl_increase@budget={b}"] == pytest.approx(0.0, abs=1e-9)
            assert m[f"ndcg10@budget={b}"] == pytest.approx(1.0)
            assert m[f"forget_em@budget={b}"] == m["forget_em_before"]
            assert m[f"other_em@budget={b}"] == m["other_em_before"]
            assert m[f"fact_acc@budget={b}"] == m["fact_acc_before"]
        assert m["forget_collateral_auc"] == 0.0
        assert "arith_acc_before" not in m  # no arithmetic probes given


def test_specificity_metrics_equal_a_hand_computed_edit(spec_env):
    model_dir, tmp = spec_env
    ZeroLayer.seen = []
    recs = _run(tmp, "zero_layer_editor,fixed_spec")
    # the editor got the 3-sequence forget set, the 5-row retain set and each budget
    assert ZeroLayer.seen[:2] == [(3, 5, 0.05), (3, 5, 0.125)]
    model = load_model(str(model_dir))
    heldout = torch.load(tmp / "heldout.pt")
    batch = Batch(heldout, torch.ones_like(heldout), torch.ones_like(heldout, dtype=torch.bool), [])
    batch.loss_mask[:, 0] = False

    def ppl() -> float:
        with torch.no_grad():
            logits = model.logits(batch)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), heldout[:, 1:].reshape(-1))
        return math.exp(float(nll))

    base = ppl()
    with model.ablate({1: torch.arange(model.num_neurons)}):
        zeroed = ppl()
    mem = [json.loads(l) for l in (tmp / "memorized.jsonl").read_text().splitlines()]
    for (method, item), rec in recs.items():
        m = rec["metrics"]
        assert m["heldout_ppl_before"] == pytest.approx(base, rel=1e-5)
        if method == "zero_layer_editor":
            assert m["heldout_ppl@budget=0.05"] == pytest.approx(zeroed, rel=1e-5)
            assert m["heldout_ppl_increase@budget=0.05"] == pytest.approx(zeroed / base - 1, abs=1e-5)
        else:  # fixed_spec through localize_then_ablate: neurons 0..3 (0.05) / 0..9 (0.125) of layer 1
            with model.ablate({1: torch.arange(10)}):
                assert m["heldout_ppl@budget=0.125"] == pytest.approx(ppl(), rel=1e-5)
        # collateral = the worst of the perplexity increase and the fractions of other memorized exact
        # match and fact accuracy removed; the AUC is the definition applied to the item's own points
        for b in ("0.05", "0.125"):
            drops = [m[f"heldout_ppl_increase@budget={b}"],
                     (m["other_em_before"] - m[f"other_em@budget={b}"]) / m["other_em_before"] if m["other_em_before"] else 0.0,
                     (m["fact_acc_before"] - m[f"fact_acc@budget={b}"]) / m["fact_acc_before"] if m["fact_acc_before"] else 0.0]
            assert m[f"collateral@budget={b}"] == pytest.approx(max(drops))
        pts = [(m[f"collateral@budget={b}"], m[f"forget_em_drop@budget={b}"]) for b in ("0.05", "0.125")]
        assert m["forget_collateral_auc"] == pytest.approx(forget_collateral_auc(pts, 0.5))
    assert len(mem) == 8


def test_specificity_paper_tasks_fail_clearly_without_weights_or_data(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEMEVAL_DATA", raising=False)
    assert main(["validate", "--schema-only", str(ROOT / "tasks")]) == 0
    code = main(["--methods", "random", "--tasks", "specificity_paper", "--output", str(tmp_path), "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and ("cannot load it" in err or "environment variable MEMEVAL_DATA is not set" in err)


# ---------------------------------------------------------------------------------------------
# Degenerate editors against the headline


class EraseAllMemorized(Editor):
    """Erases *every* memorized sequence (the forget set and the others) and nothing else: the returned model
    negates its logits on any row that starts with a memorized prefix. Perplexity on other text is unchanged,
    so a headline whose collateral is perplexity alone ranks it first (the defect of issue #12)."""

    name = "erase_all_memorized"
    summary = "negate the logits of every memorized sequence"
    prefixes: set = set()

    def edit(self, model, forget, retain, budget):
        edited = model.clone()

        def hook(_module, _args, kwargs, output):
            ids = kwargs["input_ids"]
            for row in range(ids.shape[0]):
                if tuple(ids[row, :6].tolist()) in EraseAllMemorized.prefixes:
                    output.logits[row] = -output.logits[row]
            return output

        edited.hf.register_forward_hook(hook, with_kwargs=True)
        return edited


class DegeneratePlugin:
    @hookimpl
    def memeval_methods(self):
        return [Identity, EraseAllMemorized]


def test_an_editor_that_erases_all_memorized_data_does_not_reach_the_top(memeval_plugin, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    from memeval.generation import greedy_continuations

    monkeypatch.setenv("MEMEVAL_LOAD_PLUGINS", "")
    memeval_plugin(DegeneratePlugin(), "degenerate-editors")
    model_dir = tiny_model_dir("gpt2")
    model = load_model(str(model_dir))
    gen = torch.Generator().manual_seed(1)
    prefixes = [torch.randint(3, 120, (6,), generator=gen).tolist() for _ in range(8)]
    suffixes = greedy_continuations(model, prefixes, 8)  # the model reproduces these: "memorized"
    EraseAllMemorized.prefixes = {tuple(p) for p in prefixes}
    mem = tmp_path / "memorized.jsonl"
    mem.write_text("".join(json.dumps({"input_ids": p + s, "prefix_len": 6}) + "\n" for p, s in zip(prefixes, suffixes)))
    torch.save(torch.randint(1, 120, (6, 20), generator=gen), tmp_path / "heldout.pt")
    torch.save(torch.randint(1, 120, (5, 20), generator=gen), tmp_path / "retain.pt")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "spec.yaml").write_text(
        f"task: spec_tiny\nversion: 1\nprotocol: specificity\nmodel: {model_dir}\n"
        f"data: {{source: file, path: {mem}, ppl_path: {tmp_path / 'heldout.pt'}, retain_path: {tmp_path / 'retain.pt'}, "
        f"others: 4, ppl_sequences: 6, retain_sequences: 5}}\nparams: {{budgets: [0.05], set_size: 3, sets: 1}}\n")
    recs = _run(tmp_path, "identity_editor,erase_all_memorized")
    erase = next(r["metrics"] for (m, _), r in recs.items() if m == "erase_all_memorized")
    identity = next(r["metrics"] for (m, _), r in recs.items() if m == "identity_editor")
    assert erase["forget_em_before"] == 1.0 and erase["other_em_before"] == 1.0
    assert erase["forget_em_drop@budget=0.05"] == 1.0  # it does forget the set ...
    assert erase["heldout_ppl_increase@budget=0.05"] == pytest.approx(0.0, abs=1e-6)  # ... at no perplexity cost
    assert erase["other_em_drop@budget=0.05"] == 1.0 and erase["collateral@budget=0.05"] == 1.0
    # a perplexity-only collateral would give it 1.0; the headline gives it what it gives doing nothing
    assert forget_collateral_auc([(erase["heldout_ppl_increase@budget=0.05"], 1.0)], 0.5) == pytest.approx(1.0)
    assert erase["forget_collateral_auc"] == 0.0 == identity["forget_collateral_auc"]


def test_loose_match_is_on_the_free_greedy_generation(tiny_model_dir):
    """score_sequences' loose match equals 1 − d/ℓ ≥ t with d the token Levenshtein between ``generate``'s greedy
    continuation and the suffix (Merullo et al.), not the teacher-forced argmax, at every threshold."""
    from memeval.api import TokenSequence
    from memeval.metrics import levenshtein_similarity
    from memeval.protocols.specificity import score_sequences

    model = load_model(str(tiny_model_dir("gpt2")), "cpu")
    gen = torch.Generator().manual_seed(3)

    def greedy(prefix: list[int]) -> list[int]:
        ids = torch.tensor([prefix])
        out = model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                                do_sample=False, pad_token_id=model.pad_id)
        return out[0, len(prefix):].tolist()

    seqs = []
    for i in range(6):  # suffix = the model's own greedy continuation with i tokens replaced (from position 2 on)
        prefix = torch.randint(3, 120, (4,), generator=gen).tolist()
        suffix = greedy(prefix)
        for j in range(i):
            suffix[2 + j] = 3 + (suffix[2 + j] + 50) % 117
        seqs.append(TokenSequence(f"s{i}", tuple(prefix + suffix), 4))
    similarity = [levenshtein_similarity(tuple(greedy(list(s.input_ids[:4]))), s.input_ids[4:]) for s in seqs]
    assert len(set(similarity)) > 1
    for threshold in sorted(set(similarity)):
        got = score_sequences(model, seqs, threshold).loose
        assert got == [x >= threshold for x in similarity], threshold


def test_organism_heldout_text_is_of_kinds_the_retain_set_never_contains(micro_organism):
    """The held-out perplexity is measured on document kinds disjoint from the retain set's, each kind taken in
    turn; an overlap or an unknown kind is refused naming the key."""
    from memeval.errors import UsageError
    from memeval.protocols.specificity import SpecificityData, organism_texts

    data = SpecificityData(ppl_sequences=8, retain_sequences=60)
    heldout, retain = organism_texts(micro_organism, data, 0, "spec.yaml")
    assert [h["kind"] for h in heldout] == ["code", "arithmetic"] * 4
    trained = {x["text"]: x["kind"] for x in micro_organism.train_documents()}
    assert not {h["text"] for h in heldout} & set(trained)  # never trained on
    assert {trained[t] for t in retain} == {"profile", "prose"}
    assert organism_texts(micro_organism, data, 0, "spec.yaml") == (heldout, retain)  # seeded
    with pytest.raises(ValueError, match="disjoint .* prose"):
        SpecificityData(heldout_kinds=["code", "prose"])
    with pytest.raises(UsageError, match=r"spec.yaml: data.heldout_kinds: unknown document kind 'poetry'"):
        organism_texts(micro_organism, SpecificityData(heldout_kinds=["poetry"]), 0, "spec.yaml")
