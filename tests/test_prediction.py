"""Memorization prediction: metrics by hand, ground truth = plain greedy generation, test labels never reach a
predictor, known answers (forecasting a model from itself is perfect; a constant is chance), the faithful
reproduction's selection on test is marked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memeval import hookimpl
from memeval.api import Prediction, Predictor
from memeval.cli import main
from memeval.metrics import (exact_auc, forecast_precision_recall, full_accuracy, full_accuracy_by_bin,
                             memorized_f1, predicted_m_by_bin, token_accuracy, token_auc)

T = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
B = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731


def test_prediction_metrics_by_hand():
    labels = [B(1, 1, 1, 1), B(1, 0, 0, 0), B(0, 0, 0, 0)]
    probs = [T(0.9, 0.8, 0.6, 0.7), T(0.9, 0.6, 0.1, 0.2), T(0.4, 0.1, 0.2, 0.3)]
    # token accuracy: 4 + 3 + 4 = 11 of 12 correct (the 0.6 of row 2 is wrong); full accuracy: rows 1 and 3
    assert token_accuracy(probs, labels) == pytest.approx(11 / 12)
    assert full_accuracy(probs, labels) == pytest.approx(2 / 3)
    # F1 of the matching class: TP = 5, FP = 1, FN = 0 -> 10 / 11 (accuracy of the other class would be 6/7)
    assert memorized_f1(probs, labels) == pytest.approx(10 / 11)
    # token AUC pooled over the 12 tokens: positives {0.9,0.8,0.6,0.7,0.9}, negatives {0.6,0.1,0.2,0.4,0.1,0.2,0.3}
    # pairs won: 0.9,0.8,0.7,0.9 beat all 7 (28); 0.6 beats 6 and ties one (6.5) -> 34.5 / 35
    assert token_auc(probs, labels) == pytest.approx(34.5 / 35)
    # exact-match AUC uses the sequence scores, one positive (row 1): ranked above both others -> 1.0
    assert exact_auc([0.6, 0.7, 0.1], labels) == 0.5  # 0.6 beats 0.1 only: 1 of 2 pairs
    assert exact_auc([0.6, 0.1, 0.2], labels) == 1.0
    assert exact_auc([0.5, 0.5], [B(1, 1), B(1, 1)]) is None  # one class: undefined, not faked
    # bins of true M (5 bins): M = 1 -> bin 4, M = 0.25 -> bin 1, M = 0 -> bin 0
    assert full_accuracy_by_bin(probs, labels) == [1.0, 0.0, None, None, 1.0]
    assert predicted_m_by_bin(probs, labels) == [pytest.approx(0.25), pytest.approx(0.45), None, None,
                                                 pytest.approx(0.75)]
    # forecast: memorized = {row 1}; forecast {score >= 0.5} = {rows 1, 2}: precision 1/2, recall 1
    assert forecast_precision_recall([0.9, 0.5, 0.2], labels) == (0.5, 1.0)
    assert forecast_precision_recall([0.1, 0.2, 0.3], labels) == (None, 0.0)


class Spy(Predictor):
    """Records what it is given; predicts 0.5 everywhere (chance)."""

    name = "spy_predictor"
    summary = "test predictor"
    features = ("loss", "entropy", "hidden", "zlib")
    seen: list = []

    def fit(self, train, validation):
        Spy.seen.append(("fit", [e.id for e in train], [e.id for e in validation],
                         all(e.matches is not None for e in train + validation)))

    def predict(self, test):
        Spy.seen.append(("predict", [e.id for e in test], [e.matches for e in test],
                         {k: tuple(v.shape) for k, v in test[0].features.items()}, test[0].prefix_len))
        return [Prediction(torch.full((e.suffix_len,), 0.5), 0.5) for e in test]


class SelfForecast(Predictor):
    """The feature model's own greedy matches (the early_checkpoint rule), usable on a token-level task only
    for this test: there the feature model is the scored model, so it must score perfectly."""

    name = "self_forecast"
    summary = "test predictor"
    features = ("source_matches",)

    def predict(self, test):
        return [Prediction(e.features["source_matches"], float(e.features["source_matches"].min())) for e in test]


class Plugin:
    @hookimpl
    def memeval_methods(self):
        return [Spy, SelfForecast]


def task_file(folder: Path, name: str, feature_model: str = "", model: str = "organism:micro") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\nversion: 1\nprotocol: prediction\nmodel: {model}\n"
        f"data: {{source: organism, ordinary: 40, feature_model: '{feature_model}'}}\n"
        "params: {splits: 2, fractions: [0.5, 0.25, 0.25]}\n")
    return folder


def records(out: Path) -> dict[tuple[str, str], dict]:
    return {(r["method"], r["item"]): r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


@pytest.fixture
def micro_env(micro_organism, memeval_plugin, tmp_path, monkeypatch):
    memeval_plugin(Plugin(), "prediction-test-predictors")
    return tmp_path


def test_test_labels_never_reach_a_predictor_and_splits_are_disjoint(micro_env):
    tmp = micro_env
    Spy.seen = []
    tasks = task_file(tmp / "tasks", "pred_micro")
    assert main(["--methods", "spy_predictor", "--tasks", "pred_micro", "--include-path", str(tasks),
                 "--output", str(tmp / "out"), "--device", "cpu"]) == 0
    fits = [s for s in Spy.seen if s[0] == "fit"]
    predicts = [s for s in Spy.seen if s[0] == "predict"]
    assert len(fits) == len(predicts) == 2
    for (_, train, val, labelled), (_, test, test_labels, shapes, k) in zip(fits, predicts):
        assert labelled and all(m is None for m in test_labels)
        assert not (set(train) & set(test)) and not (set(val) & set(test)) and not (set(train) & set(val))
        assert shapes["loss"] == shapes["entropy"] == (shapes["hidden"][0] - k + 1,) and shapes["zlib"] == (1,)
    assert fits[0][1] != fits[1][1]  # two seeded splits
    rec = records(tmp / "out")[("spy_predictor", "split0")]["metrics"]
    assert rec["token_auc"] == pytest.approx(0.5) and rec["selected_on_test"] == 0.0


def test_ground_truth_is_plain_greedy_generation(micro_env, micro_organism):
    from memeval.loading import load_model
    from memeval.protocols.prediction import PredictionProtocol
    from memeval.tasks import parse_task

    task = parse_task(task_file(micro_env / "tasks", "pred_micro") / "pred_micro.yaml")
    model = load_model("organism:micro")
    protocol = PredictionProtocol(task, model, 0)
    protocol.prepare()
    for seq in list(protocol.sequences.values())[:: max(1, len(protocol.sequences) // 8)]:
        prefix = torch.tensor([seq.input_ids[: seq.prefix_len]])
        n = len(seq.input_ids) - seq.prefix_len
        out = model.hf.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=model.pad_id)[0, seq.prefix_len:]
        assert protocol.truth[seq.id].tolist() == (out == torch.tensor(seq.input_ids[seq.prefix_len:])).tolist()


def test_forecasting_a_model_from_itself_is_perfect_and_source_matches_is_withheld_on_token_tasks(
        micro_env, micro_organism, capsys):
    tmp = micro_env
    exported = micro_organism.export(tmp / "exported")
    # forecast task whose feature model is the final model itself: its own matches are exactly the labels
    task_file(tmp / "tasks", "self_forecast_micro", feature_model=str(exported))
    task_file(tmp / "tasks", "pred_micro")
    code = main(["--methods", "self_forecast,early_checkpoint", "--tasks", "self_forecast_micro,pred_micro",
                 "--include-path", str(tmp / "tasks"), "--output", str(tmp / "out"), "--device", "cpu"])
    assert code == 0
    recs = records(tmp / "out")
    for method in ("self_forecast", "early_checkpoint"):
        m = recs[(method, "split0")]["metrics"]
        assert m["token_accuracy"] == 1.0 and m["full_accuracy"] == 1.0 and m["token_auc"] in (1.0, None)
        if m["test_exact"] > 0:
            assert m["forecast_recall"] == 1.0 and m["forecast_precision"] == 1.0
    # on the token-level task the feature model's matches are the labels: such predictors are skipped
    assert not any(task == "pred_micro" for (_, _), r in recs.items() for task in [r["task"]])
    assert "self_forecast skipped on pred_micro" in capsys.readouterr().err


@pytest.mark.slow
def test_predictors_beat_chance_on_the_organism_and_faithful_selection_is_marked(micro_env):
    tmp = micro_env
    tasks = task_file(tmp / "tasks", "pred_micro")
    code = main(["--methods", "loss_threshold,logistic_probe,transformer_predictor", "--tasks", "pred_micro",
                 "--include-path", str(tasks), "--output", str(tmp / "out"), "--device", "cpu",
                 "--method-config", "transformer_predictor.epochs=3"])
    assert code == 0
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    auc = {e["method"]: e["metrics"]["token_auc"]["mean"] for e in summary["results"]}
    # a memorized token has a low loss: the loss baseline must rank matches above mismatches
    assert auc["loss_threshold"] > 0.7, auc
    assert auc["logistic_probe"] > 0.6, auc
    code = main(["--methods", "transformer_predictor", "--tasks", "pred_micro", "--include-path", str(tasks),
                 "--output", str(tmp / "out"), "--device", "cpu", "--method-config", "transformer_predictor.epochs=2",
                 "--method-config", "transformer_predictor.faithful=true"])
    assert code == 0
    faithful = [r for r in map(json.loads, (tmp / "out" / "results.jsonl").read_text().splitlines())
                if r["method"] == "transformer_predictor" and r["metrics"]["selected_on_test"] == 1.0]
    assert len(faithful) == 2


def test_paper_tasks_fail_in_one_line_without_data(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEMEVAL_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["--methods", "entropy", "--tasks", "memo_prediction_paper", "--output", str(tmp_path), "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "environment variable MEMEVAL_DATA is not set" in err
    assert len([l for l in err.splitlines() if l.startswith("memeval: error")]) == 1 and "Traceback" not in err


def test_readme_predictor_example_runs_and_beats_chance(micro_env, memeval_plugin):
    """The predictor example of README's prediction section, executed as written and scored on the organism."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Memorization prediction**"):readme.index("## Model organisms")]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    scope: dict = {}
    exec(code, scope)

    class ReadmePlugin:
        @hookimpl
        def memeval_methods(self):
            return [scope["LowLoss"]]

    memeval_plugin(ReadmePlugin(), "readme-predictor")
    tasks = task_file(micro_env / "tasks", "pred_micro")
    assert main(["--methods", "low_loss", "--tasks", "pred_micro", "--include-path", str(tasks),
                 "--output", str(micro_env / "out"), "--device", "cpu"]) == 0
    summary = json.loads((micro_env / "out" / "summary.json").read_text())
    assert summary["results"][0]["metrics"]["token_auc"]["mean"] > 0.7
