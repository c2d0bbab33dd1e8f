"""Editors on a tiny model that memorized planted sequences: each removes what it should, in direction,
and never modifies the model it was given. K-FAC's vectorised selection equals the sorted (heap) order."""

from __future__ import annotations

import random

import pytest
import torch

from memeval.api import Batch, SequenceSet, TokenSequence
from memeval.metrics import suffix_exact_match, token_correct
from memeval.loading import load_model
from memeval.testing import build_tiny_model, write_memorized_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "north", "seven", "quiet", "lamp"]


@pytest.fixture(scope="module")
def memorizer(tmp_path_factory):
    """A tiny GPT-2 (d 48, 2 layers, 192 neurons) fine-tuned on 8 random 24-token sequences (memorized
    exactly) mixed with random-word text (learnable only in part): about 10 s on one core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = build_tiny_model("gpt2", tmp_path_factory.mktemp("memorizer") / "gpt2", hidden=48, layers=2,
                                intermediate=192)
        model = load_model(str(path))
        rng = random.Random(0)
        vocab = len(model.tokenizer)
        planted = [TokenSequence(f"m{i}", tuple(rng.randrange(1, vocab) for _ in range(24)), 8) for i in range(8)]

        def text(tag: str, i: int) -> TokenSequence:
            ids = model.tokenizer(" ".join(rng.choice(WORDS) for _ in range(12)))["input_ids"][:24]
            return TokenSequence(f"{tag}{i}", tuple(ids), 0)

        general = [text("g", i) for i in range(200)]
        heldout = [text("h", i) for i in range(32)]
        hf = model.hf.train()
        for p in hf.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(hf.parameters(), lr=5e-3)
        torch.manual_seed(0)
        for _ in range(200):
            rows = [TokenSequence(s.id, s.input_ids, 0) for s in planted + rng.sample(general, 16)]
            b = Batch.from_sequences(rows, model.pad_id, "cpu")
            logits = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
            m = b.loss_mask[:, 1:].float()
            loss = -(logp * m).sum() / m.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        hf.eval()
        for p in hf.parameters():
            p.requires_grad_(False)
        assert exact(model, planted) == 1.0, "the fixture failed to memorize its planted sequences"
        return {"model": model, "forget": planted[:4], "probe": planted[4:], "heldout": heldout,
                "retain": SequenceSet(general[:64], model.pad_id)}
    finally:
        torch.set_num_threads(threads)


def exact(model, seqs) -> float:
    b = Batch.from_sequences(seqs, model.pad_id, "cpu")
    with torch.no_grad():
        c = token_correct(model.logits(b), b.input_ids)
    return float(suffix_exact_match(c, b.loss_mask).float().mean())


def heldout_nll(model, seqs) -> float:
    b = Batch.from_sequences(seqs, model.pad_id, "cpu")
    b.loss_mask[:, 0] = False
    with torch.no_grad():
        return float(model.sequence_nll(b).mean())


def run_edit(memorizer, editor, budget, with_forget=True, with_retain=True):
    model = memorizer["model"]
    fp = model.fingerprint()
    forget = SequenceSet(memorizer["forget"], model.pad_id) if with_forget else None
    edited = editor.edit(model, forget, memorizer["retain"] if with_retain else None, budget)
    assert edited is not model and edited.hf is not model.hf
    assert model.fingerprint() == fp, "the editor modified the model it was given"
    assert edited.fingerprint() != fp
    before = heldout_nll(model, memorizer["heldout"])
    return {"forget": exact(edited, memorizer["forget"]), "probe": exact(edited, memorizer["probe"]),
            "heldout_increase": heldout_nll(edited, memorizer["heldout"]) - before}


# ---------------------------------------------------------------------------------------------
# Each editor, in direction


def test_kfac_removes_memorization_without_a_forget_set(memorizer, tmp_path, monkeypatch):
    from memeval_methods import kfac_curvature as kc

    monkeypatch.setenv("MEMEVAL_CACHE", str(tmp_path))
    r = run_edit(memorizer, kc.KFACCurvature(), 0.02, with_forget=False)
    # every planted sequence (none was named) loses its exact match; general text barely moves
    assert r["forget"] == 0.0 and r["probe"] == 0.0
    assert r["heldout_increase"] < 0.2
    # the factors are cached on disk: a new instance does not collect them again
    assert list((tmp_path / "kfac").glob("*/factors.pt"))
    monkeypatch.setattr(kc, "collect_factors", lambda *a, **k: pytest.fail("factors were recollected"))
    r2 = run_edit(memorizer, kc.KFACCurvature(), 0.02, with_forget=False)
    assert r2 == pytest.approx(r)


def test_kfac_without_retain_set_samples_general_text(memorizer, tmp_path, monkeypatch):
    from memeval_methods.kfac_curvature import KFACCurvature

    monkeypatch.setenv("MEMEVAL_CACHE", str(tmp_path))
    # (DEL at set granularity gives no retain set; the edit still runs, on text sampled from the model)
    r = run_edit(memorizer, KFACCurvature(), 0.3, with_forget=False, with_retain=False)
    assert 0.0 <= r["forget"] <= 1.0 and abs(r["heldout_increase"]) < 10


def test_selective_pruning_prunes_forget_specific_neurons(memorizer):
    from memeval_methods.selective_pruning import SelectivePruning

    r = run_edit(memorizer, SelectivePruning(), 0.3)
    assert r["forget"] < 1.0
    assert r["heldout_increase"] < 0.1
    edited = SelectivePruning().edit(memorizer["model"], SequenceSet(memorizer["forget"], 0), memorizer["retain"], 0.1)
    zero_cols = sum(int((edited.down_proj(l) == 0).all(0).sum()) for l in range(edited.num_layers))
    assert zero_cols == round(0.1 * 2 * 192)  # budget = fraction of all MLP neurons, global top-k
    # the default (attn_fraction 0) leaves every attention output projection as it was
    model = memorizer["model"]
    assert all(torch.equal(edited.attn_out_proj(l), model.attn_out_proj(l)) for l in range(model.num_layers))


def test_selective_pruning_with_attention_neurons(memorizer):
    from memeval_methods.selective_pruning import SelectivePruning

    model = memorizer["model"]
    fp = model.fingerprint()
    forget = SequenceSet(memorizer["forget"], model.pad_id)

    def edit(**config):
        edited = SelectivePruning(SelectivePruning.Config(**config)).edit(model, forget, memorizer["retain"], 0.1)
        assert model.fingerprint() == fp, "the editor modified the model it was given"
        return edited

    edited = edit(attn_fraction=0.02)
    mlp = sum(int((edited.down_proj(l) == 0).all(0).sum()) for l in range(2))
    attn = sum(int((edited.attn_out_proj(l) == 0).all(0).sum()) for l in range(2))
    # attention budget = budget × attn_fraction / step_fraction of the 2 × 48 attention neurons
    assert mlp == round(0.1 * 2 * 192) and attn == round(0.1 * 0.02 / 0.02 * 2 * 48)
    # statistics collected once: pruning attention neurons too leaves the choice of MLP neurons unchanged
    once, both = edit(iterative=False), edit(iterative=False, attn_fraction=0.02)
    assert all(torch.equal(once.down_proj(l), both.down_proj(l)) for l in range(2))
    assert not all(torch.equal(once.attn_out_proj(l), both.attn_out_proj(l)) for l in range(2))


def test_balanced_subnet_forgets_the_set(memorizer):
    from memeval_methods.balanced_subnet import BalancedSubnet

    editor = BalancedSubnet(BalancedSubnet.Config(optimizer="adam", lr=0.05, loss_weighting=0.9))
    r = run_edit(memorizer, editor, 0.2)
    assert r["forget"] == 0.0
    assert r["heldout_increase"] < 0.1
    edited = editor.edit(memorizer["model"], SequenceSet(memorizer["forget"], 0), memorizer["retain"], 0.2)
    w = edited.down_proj(1)
    assert float((w == 0).float().mean()) == pytest.approx(0.2, abs=0.01)  # budget = fraction masked


def test_balanced_subnet_guards_an_empty_retain_group(memorizer):
    from memeval_methods.balanced_subnet import BalancedSubnet

    model = memorizer["model"]
    edited = BalancedSubnet(BalancedSubnet.Config(epochs=1, sampled_sequences=4, sampled_length=12)).edit(
        model, SequenceSet(memorizer["forget"], model.pad_id), SequenceSet([], model.pad_id), 0.1)
    assert all(torch.isfinite(p).all() for p in edited.hf.parameters())


@pytest.mark.parametrize("name", ["gradient_ascent", "npo"])
def test_unlearning_baselines_forget_the_set(memorizer, name):
    from memeval_methods.gradient_ascent import GradientAscent
    from memeval_methods.npo import NPO

    editor = {"gradient_ascent": GradientAscent, "npo": NPO}[name]()
    assert run_edit(memorizer, editor, 0.05)["forget"] == 1.0  # 5 steps: not yet
    r = run_edit(memorizer, editor, 1.0)  # the full schedule: 100 steps
    assert r["forget"] == 0.0
    assert r["heldout_increase"] < 0.1


def test_random_localizer_as_editor_leaves_memorization(memorizer):
    from memeval.adapters import localize_then_ablate
    from memeval_methods.random_localizer import RandomLocalizer

    r = run_edit(memorizer, localize_then_ablate(RandomLocalizer()), 0.05)
    assert r["forget"] == 1.0 and r["probe"] == 1.0


def test_forget_set_editors_refuse_no_forget_set(memorizer):
    from memeval.errors import UsageError
    from memeval_methods.selective_pruning import SelectivePruning

    with pytest.raises(UsageError, match="forget set"):
        SelectivePruning().edit(memorizer["model"], None, memorizer["retain"], 0.1)


# ---------------------------------------------------------------------------------------------
# K-FAC pieces


def test_kfac_selection_equals_the_sorted_heap_order():
    from memeval_methods.kfac_curvature import keep_mask

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        lam = torch.rand(9, generator=gen) ** 3
        mu = torch.rand(6, generator=gen) ** 2
        rho = float(torch.rand(1, generator=gen))
        prod = torch.outer(lam.double(), mu.double()).flatten()
        ordered, _ = prod.sort(descending=True)
        k = int((ordered.cumsum(0) < rho * prod.sum()).sum()) + 1  # the heap pops k pairs
        expected = prod >= ordered[k - 1]
        assert torch.equal(keep_mask(lam, mu, rho).flatten(), expected)
    assert keep_mask(torch.ones(3), torch.ones(2), 1.0).all()


def test_kfac_edit_keeps_everything_at_rho_one_and_projects_otherwise():
    from memeval_methods.kfac_curvature import eigh_desc, kfac_edit_weight

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 4, generator=gen)
    a = torch.randn(4, 4, generator=gen)
    g = torch.randn(5, 5, generator=gen)
    eig_a, eig_g = eigh_desc(a @ a.T), eigh_desc(g @ g.T)
    same, frac = kfac_edit_weight(w, eig_g, eig_a, 1.0)
    assert frac == 1.0 and torch.allclose(same, w, atol=1e-5)
    (lam, ug), (mu, ua) = eig_g, eig_a
    new, frac = kfac_edit_weight(w, eig_g, eig_a, 0.5)
    coef = ug.T @ new.double() @ ua
    kept = torch.outer(lam, mu) >= torch.outer(lam, mu).flatten().sort(descending=True).values[int(frac * 20) - 1]
    assert torch.allclose(coef[~kept], torch.zeros(()).double(), atol=1e-5)
    assert torch.allclose(coef[kept], (ug.T @ w.double() @ ua)[kept], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Editors in DEL at set granularity (no retain set) and in the runner (fingerprint check)


def test_editors_run_in_deletion_set_granularity(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from memeval.cli import main

    monkeypatch.setenv("MEMEVAL_LOAD_PLUGINS", "")  # the editors are built in: registered by memeval itself
    model_dir = tiny_model_dir("gpt2")
    gen = torch.Generator().manual_seed(0)
    mem = tmp_path / "memorized.jsonl"
    write_memorized_jsonl(mem, 6, gen)
    torch.save(torch.randint(1, 120, (4, 20), generator=gen), tmp_path / "ppl.pt")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "del.yaml").write_text(
        f"task: del_set_tiny\nversion: 1\nprotocol: deletion\nmodel: {model_dir}\n"
        f"data: {{source: file, path: {mem}, dev: 1, targets: 5, negatives: 5, ppl_path: {tmp_path / 'ppl.pt'}, "
        "ppl_sequences: 4}\n"
        "params: {ratios: [0.05, 0.125], granularity: set, set_size: 2, sets: 2}\n")
    out = tmp_path / "out"
    code = main(["--methods", "kfac_curvature,selective_pruning,random,balanced_subnet", "--tasks", "del_set_tiny", "--include-path",
                 str(tasks), "--output", str(out), "--device", "cpu",
                 "--method-config", "kfac_curvature.sampled_sequences=4",
                 "--method-config", "selective_pruning.sampled_sequences=4",
                 "--method-config", "selective_pruning.per_layer=true", "--method-config", "selective_pruning.skip_layers=0",
                 "--method-config", "balanced_subnet.epochs=1", "--method-config", "balanced_subnet.sampled_sequences=4"])
    assert code == 0
    recs = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    # balanced_subnet re-registers the weights it masked: its cost is still counted (by parameter name)
    assert len(recs) == 8 and all("metrics" in r for r in recs), recs  # no error, no fingerprint change
    assert all(r["metrics"]["d_rand_ppl@0.125"] != 0 for r in recs if r["method"] != "random")
    # equal cost: per layer, selective pruning removes what the localizers' ablation zeroes (int(80·r) in
    # layer 1 of the 2-layer model: 4 and 10), where the global budget removed round(r·2·80) = 8 and 20
    by = {(r["method"], r["item"]): r["metrics"] for r in recs}
    for item in ("set0", "set1"):
        sp, rnd, kf = by[("selective_pruning", item)], by[("random", item)], by[("kfac_curvature", item)]
        assert sp["neurons_removed@0.05"] == rnd["neurons_removed@0.05"] == 4
        assert sp["neurons_removed@0.125"] == rnd["neurons_removed@0.125"] == 10
        assert kf["neurons_removed@0.125"] == 0 and kf["weights_changed@0.125"] > sp["weights_changed@0.125"] > 0


# ---------------------------------------------------------------------------------------------
# A fused gate/up projection (Phi-3's mlp.gate_up_proj: hidden → 2 × neurons, split inside the MLP)


@pytest.fixture(scope="module")
def phi3(tiny_model_dir):
    """The tiny Phi-3 (hidden 32, 80 neurons) with random token sequences as forget and retain sets."""
    model = load_model(str(tiny_model_dir("phi3")))
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(1, len(model.tokenizer), (20, 12), generator=gen).tolist()
    return {"model": model, "forget": SequenceSet([TokenSequence(f"f{i}", tuple(r), 4) for i, r in enumerate(rows[:4])],
                                                  model.pad_id),
            "retain": SequenceSet([TokenSequence(f"r{i}", tuple(r), 0) for i, r in enumerate(rows[4:])], model.pad_id)}


def fused(model, layer: int) -> torch.Tensor:
    return model.hf.model.layers[layer].mlp.gate_up_proj.weight


def test_mlp_matrices_name_the_fused_gate_up_projection(phi3, tiny_model_dir):
    from memeval_methods._editing import mlp_matrices

    model = phi3["model"]
    for l in range(model.num_layers):
        mats = mlp_matrices(model, l)
        assert list(mats) == ["gate_up", "down"]
        assert mats["gate_up"] is model.hf.model.layers[l].mlp.gate_up_proj and mats["down"] is model.down_projs[l]
        assert tuple(mats["gate_up"].weight.shape) == (2 * model.num_neurons, model.hidden_size)
    # separate projections keep their names
    assert list(mlp_matrices(load_model(str(tiny_model_dir("llama"))), 0)) == ["gate", "up", "down"]
    # with 32 neurons, attention's qkv_proj (32 → 64) and o_proj (32 → 32) have MLP-like shapes: never taken
    from transformers import AutoModelForCausalLM

    from memeval.models import NeuronModel
    from memeval.testing import tiny_config

    narrow = NeuronModel(AutoModelForCausalLM.from_config(tiny_config("phi3", 100, intermediate=32)), None, "narrow")
    assert narrow.num_neurons == 32
    assert mlp_matrices(narrow, 0) == {"gate_up": narrow.hf.model.layers[0].mlp.gate_up_proj,
                                       "down": narrow.down_projs[0]}


def test_kfac_edits_the_fused_projection(phi3, tmp_path, monkeypatch):
    from memeval_methods.kfac_curvature import KFACCurvature

    monkeypatch.setenv("MEMEVAL_CACHE", str(tmp_path))
    model, retain = phi3["model"], phi3["retain"]
    fp = model.fingerprint()
    editor = KFACCurvature()
    edited = editor.edit(model, None, retain, 0.3)
    assert model.fingerprint() == fp, "the editor modified the model it was given"
    eig = editor.factors(model, retain)
    for l in range(model.num_layers):
        assert not torch.equal(fused(edited, l), fused(model, l))
        assert not torch.equal(edited.down_proj(l), model.down_proj(l))
        # G over the 160 fused outputs, A over the 32 inputs; dropped eigencomponents are exactly zero
        (_, ug), (_, ua) = eig[f"{l}.gate_up"]["G"], eig[f"{l}.gate_up"]["A"]
        assert ug.shape == (160, 160) and ua.shape == (32, 32)
        coef = ug.T @ fused(edited, l).double() @ ua
        dropped = (coef.abs() < 1e-6).float().mean()
        assert 0 < dropped < 1
    # the fused matrix alone can be named in the config
    only = KFACCurvature(KFACCurvature.Config(projections=["gate_up"])).edit(model, None, retain, 0.3)
    assert all(torch.equal(only.down_proj(l), model.down_proj(l)) for l in range(model.num_layers))
    torch.testing.assert_close(fused(only, 0), fused(edited, 0))


def test_kfac_rebuilds_a_cache_entry_without_the_fused_projection(phi3, tmp_path, monkeypatch):
    from memeval_methods import kfac_curvature as kc

    monkeypatch.setenv("MEMEVAL_CACHE", str(tmp_path))
    model, retain = phi3["model"], phi3["retain"]
    expected = kc.KFACCurvature().edit(model, None, retain, 0.3)
    (path,) = (tmp_path / "kfac").glob("*/factors.pt")
    torch.save({k: v for k, v in torch.load(path).items() if not k.endswith("gate_up")}, path)  # an older entry
    calls = []
    collect = kc.collect_factors
    monkeypatch.setattr(kc, "collect_factors", lambda *a, **k: calls.append(1) or collect(*a, **k))
    edited = kc.KFACCurvature().edit(model, None, retain, 0.3)
    assert calls == [1]
    assert all(torch.equal(fused(edited, l), fused(expected, l)) for l in range(model.num_layers))
    assert {k for k in torch.load(path) if k.endswith("gate_up")} == {"0.gate_up", "1.gate_up"}


def test_balanced_subnet_masks_the_fused_projection(phi3):
    from memeval_methods.balanced_subnet import BalancedSubnet

    model = phi3["model"]
    fp = model.fingerprint()
    edited = BalancedSubnet(BalancedSubnet.Config(epochs=2, batch_size=4)).edit(model, phi3["forget"],
                                                                                phi3["retain"], 0.2)
    assert model.fingerprint() == fp, "the editor modified the model it was given"
    n = model.num_neurons
    for l in range(model.num_layers):
        w = fused(edited, l)
        assert float((w == 0).float().mean()) == pytest.approx(0.2, abs=0.01)  # budget = fraction masked
        assert bool((w[:n] == 0).any()) and bool((w[n:] == 0).any())  # both the gate and the up half
        kept = w != 0
        assert torch.equal(w[kept], fused(model, l)[kept])  # a mask: kept entries are unchanged, bit for bit
        assert float((edited.down_proj(l) == 0).float().mean()) == pytest.approx(0.2, abs=0.01)
