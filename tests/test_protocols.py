"""INJ and DEL on tiny models with known answers: a planted neuron set, a hand-computed deletion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memeval import hookimpl
from memeval.api import Batch, Localizer, TokenSequence
from memeval.cli import main
from memeval.metrics import masked_mean, token_correct
from memeval.loading import load_model
from memeval.testing import write_memorized_jsonl

ROOT = Path(__file__).resolve().parent.parent


class WeightDiff(Localizer):
    """Oracle for INJ: the norm of each down-projection column's change from the base model."""

    name = "weight_diff"
    summary = "test oracle"
    base = None

    def localize(self, model, batch):
        diffs = [(model.down_proj(l) - self.base.down_proj(l)).norm(dim=0) for l in range(model.num_layers)]
        return torch.stack(diffs)[None].expand(len(batch), -1, -1)


class ColumnNorm(Localizer):
    """Scores each neuron by its down-projection column's norm (what Activations' ‖v‖ factor sees)."""

    name = "column_norm"
    summary = "test localizer"

    def localize(self, model, batch):
        norms = torch.stack([model.down_proj(l).norm(dim=0) for l in range(model.num_layers)])
        return norms[None].expand(len(batch), -1, -1)


class FixedNeurons(Localizer):
    """Scores neurons 0..9 of every layer highest, in decreasing order."""

    name = "fixed"
    summary = "test localizer"

    def localize(self, model, batch):
        scores = torch.zeros(len(batch), model.num_layers, model.num_neurons, device=model.device)
        scores[:, :, :10] = torch.arange(10, 0, -1, device=model.device, dtype=torch.float32)
        return scores


class Plugin:
    @hookimpl
    def memeval_methods(self):
        return [WeightDiff, ColumnNorm, FixedNeurons]


def run(tasks: Path, out: Path, methods: str, task: str, *extra: str) -> dict:
    code = main(["--methods", methods, "--tasks", task, "--include-path", str(tasks), "--output", str(out),
                 "--device", "cpu", *extra])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def env(memeval_plugin, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMEVAL_LOAD_PLUGINS", "")
    memeval_plugin(Plugin(), "protocol-test-methods")
    model_dir = tiny_model_dir("gpt2")
    return model_dir, tmp_path


def injection_task(model_dir: Path, tmp: Path, words: tuple[str, ...], params: str) -> Path:
    """A task folder with one INJ task ``inj_tiny`` over short texts (one per word, the last one as dev)."""
    WeightDiff.base = load_model(str(model_dir))
    texts = tmp / "texts.jsonl"
    texts.write_text("".join(json.dumps({"definition": f"alpha river {w} stone north seven quiet lamp gamma"}) + "\n"
                             for w in words))
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "inj.yaml").write_text(
        f"task: inj_tiny\nversion: 1\nprotocol: injection\nmodel: {model_dir}\n"
        f"data: {{source: file, path: {texts}, sequences: {len(words) - 1}, dev: 1, max_tokens: 16}}\n"
        f"params: {params}\n")
    return tasks


def test_injection_oracle_finds_every_planted_neuron_and_random_does_not(env):
    model_dir, tmp = env
    tasks = injection_task(model_dir, tmp, ("beta", "delta", "seven", "quiet", "lamp"),
                           "{ratio: 0.05, multiples: [1, 5], max_steps: 30, stop_loss: 5.3}")
    summary = run(tasks, tmp / "out", "weight_diff,random", "inj_tiny")
    res = {e["method"]: e["metrics"] for e in summary["results"]}
    oracle = res["weight_diff"]
    # Every injected column changed and nothing else did: a perfect ranking.
    assert oracle["global_recall@1x"]["mean"] == 1.0
    assert oracle["ap"]["mean"] == 1.0 and oracle["auc"]["mean"] == 1.0
    # Per-layer top-k can only reach the ceiling set by how the gold neurons fell across layers.
    assert oracle["recall@1x"]["mean"] == pytest.approx(oracle["ceiling@1x"]["mean"])
    assert oracle["recall@5x"]["mean"] == 1.0
    rnd = res["random"]
    assert rnd["auc"]["mean"] < 0.85 and rnd["global_recall@1x"]["mean"] < 0.5
    # The injected model is restored between items: the base weights are untouched.
    assert load_model(str(model_dir)).fingerprint() == WeightDiff.base.fingerprint()


# stop losses that every injection of this tiny model reaches in 30 steps (from about 5.56), so every item is
# scored (a failed injection has no recall: InjectionProtocol scores it injected = 0, other metrics null)
@pytest.mark.parametrize("preserve_norm", [False, True])
def test_norm_preserving_injection_leaves_no_trace_in_column_norms(env, preserve_norm):
    model_dir, tmp = env
    tasks = injection_task(model_dir, tmp, ("beta", "delta", "seven", "quiet"),
                           f"{{ratio: 0.2, max_steps: 30, lr: 0.05, preserve_norm: {str(preserve_norm).lower()}, "
                           f"stop_loss: {5.52 if preserve_norm else 5.2}}}")
    res = {e["method"]: e["metrics"] for e in run(tasks, tmp / "out", "weight_diff,column_norm", "inj_tiny")["results"]}
    # The columns move either way (the weight-difference oracle still ranks them perfectly) ...
    assert res["weight_diff"]["auc"]["mean"] == 1.0
    # ... but only unconstrained Adam makes them stand out by their norm.
    if preserve_norm:
        assert res["column_norm"]["auc"]["mean"] < 0.8
    else:
        assert res["column_norm"]["auc"]["mean"] > 0.95


def test_failed_injections_report_injected_0_and_do_not_enter_recall(env):
    """Recall is over injected items only: with a stop loss that some items miss, those items report
    injected = 0 and no recall (null), and the pair's recall is the mean over the injected items alone."""
    model_dir, tmp = env
    tasks = injection_task(model_dir, tmp, ("beta", "delta", "seven", "quiet", "lamp"),
                           "{ratio: 0.05, multiples: [1], max_steps: 30, stop_loss: 5.26}")
    summary = run(tasks, tmp / "out", "weight_diff", "inj_tiny")
    recs = [r for r in records(tmp / "out") if r["method"] == "weight_diff"]
    failed = [r["metrics"] for r in recs if r["metrics"]["injected"] == 0.0]
    done = [r["metrics"] for r in recs if r["metrics"]["injected"] == 1.0]
    assert failed and done, "the stop loss splits the items"
    assert all(m["recall@1x"] is None and m["auc"] is None for m in failed)
    metrics = summary["results"][0]["metrics"]
    assert metrics["recall@1x"]["mean"] == pytest.approx(sum(m["recall@1x"] for m in done) / len(done))
    assert metrics["injected"]["mean"] == pytest.approx(len(done) / len(recs))


def test_deletion_metrics_equal_a_hand_computed_ablation(env):
    model_dir, tmp = env
    model = load_model(str(model_dir))
    gen = torch.Generator().manual_seed(0)
    mem = tmp / "memorized.jsonl"
    seqs = write_memorized_jsonl(mem, 6, gen)
    ppl = tmp / "ppl.pt"
    torch.save(torch.randint(1, 120, (4, 20), generator=gen), ppl)
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "del.yaml").write_text(
        f"task: del_tiny\nversion: 1\nprotocol: deletion\nmodel: {model_dir}\n"
        f"data: {{source: file, path: {mem}, dev: 1, targets: 5, negatives: 5, ppl_path: {ppl}, ppl_sequences: 4}}\n"
        "params: {ratios: [0.05, 0.125], skip_layers: [0]}\n")
    run(tasks, tmp / "out", "fixed", "del_tiny")
    recs = {r["item"]: r["metrics"] for r in records(tmp / "out")}
    assert len(recs) == 5

    def acc(seq: TokenSequence) -> float:
        batch = Batch.from_sequences([seq], model.pad_id, "cpu")
        with torch.no_grad():
            return float(masked_mean(token_correct(model.logits(batch), batch.input_ids), batch.loss_mask)[0])

    by_id = {f"memorized:{i}": s for i, s in enumerate(seqs)}
    for item, metrics in recs.items():
        seq = by_id[item]
        before = acc(seq)
        # ratio 0.125 of 80 neurons = 10 per layer: neurons 0..9, in layer 1 only (layer 0 skipped)
        with model.ablate({1: torch.arange(10)}):
            after = acc(seq)
        assert metrics["d_self_acc@0.125"] == pytest.approx(after - before)
        with model.ablate({1: torch.arange(4)}):  # int(80 * 0.05) = 4
            after_small = acc(seq)
        assert metrics["d_self_acc@0.05"] == pytest.approx(after_small - before)
        assert metrics["self_acc_before"] == pytest.approx(before)
    # The dev split holds the one remaining sequence, scored apart and never ranked.
    summary = run(tasks, tmp / "dev", "fixed", "del_tiny", "--split", "dev")
    dev_items = {r["item"] for r in records(tmp / "dev")}
    assert len(dev_items) == 1 and not dev_items & set(recs)
    assert summary["meta"]["split"] == "dev" and summary["meta"]["limited"] is True


@pytest.mark.parametrize("group", ["del_paper", "inj_paper"])
def test_paper_tasks_fail_clearly_without_weights_or_data(group, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEMEVAL_DATA", raising=False)
    assert main(["validate", "--schema-only", str(ROOT / "tasks")]) == 0
    code = main(["--methods", "random", "--tasks", group, "--output", str(tmp_path), "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and ("cannot load it" in err or "data.path" in err)
