"""The a-priori detection protocol: YAML validation, what a detector receives, resuming a killed pool, the
CLI and the site (the estimators themselves are in test_detection_estimators.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from memeval.api import ClassifierModel, Detector, LabeledSamples, ShadowModels
from memeval.errors import UsageError


# ---------------------------------------------------------------------------------------------- YAML


def _task_yaml(tmp_path: Path, params: str, name: str = "det_tiny", data: str = "{source: digits, pool: 240}") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        task: {name}
        version: 1
        protocol: detection
        model: mlp
        data: {data}
        params: {params}
        """))
    return path


@pytest.mark.parametrize("params, needle", [
    ("{models: 4}", "at least 4 shadows"),
    ("{models: 8, shadows: 3}", "at least 4 shadows"),
    ("{eta: -1}", "eta"),
    ("{eta: .nan}", "eta"),
    ("{checkpoints: [0.1, 1.0]}", "checkpoints: 1.0"),
    ("{checkpoints: [0.0, 0.5]}", "checkpoints: 0.0"),
    ("{top_q: 1.5}", "top_q"),
])
def test_bad_params_are_one_line_errors(tmp_path, params, needle):
    from memeval.tasks import parse_task

    path = _task_yaml(tmp_path, params)
    with pytest.raises(UsageError) as e:
        parse_task(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:6: params:") and needle in msg


def test_bad_params_exit_2_without_traceback(tmp_path):
    path = _task_yaml(tmp_path, "{models: 3}")
    r = subprocess.run([sys.executable, "-m", "memeval.cli", "validate", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "at least 4 shadows" in r.stderr


def test_paper_task_without_data_fails_in_one_line(monkeypatch, tmp_path):
    from memeval.errors import UsageError as UE
    from memeval.protocols.detection import DetectionProtocol
    from memeval.tasks import load_tasks

    monkeypatch.setenv("MEMEVAL_DATA", str(tmp_path))
    task = load_tasks().tasks["detection_mmlu_mistral"]
    with pytest.raises(UE) as e:
        DetectionProtocol.check_task(task)
    assert "\n" not in str(e.value) and "mmlu.jsonl" in str(e.value) and "not found" in str(e.value)


# ---------------------------------------------------------------------------------------------- the protocol

TINY = "{models: 8, epochs: 40, batch_size: 32, lr: 3.0e-3, hidden: [48], checkpoints: [0.05, 0.1, 0.2, 0.4, 0.7]}"


@pytest.fixture(scope="module")
def tiny_protocol(tmp_path_factory):
    from memeval.protocols.detection import DetectionProtocol
    from memeval.tasks import parse_task

    cache = tmp_path_factory.mktemp("det-cache")
    old = os.environ.get("MEMEVAL_CACHE")
    os.environ["MEMEVAL_CACHE"] = str(cache)
    try:
        task = parse_task(_task_yaml(tmp_path_factory.mktemp("det-task"), TINY, data="{source: digits, pool: 400}"))
        proto = DetectionProtocol(task, DetectionProtocol.load_model(task, "cpu", torch.float32), 0)
        proto.prepare()
        yield proto
    finally:
        if old is None:
            os.environ.pop("MEMEVAL_CACHE", None)
        else:
            os.environ["MEMEVAL_CACHE"] = old


class Spy(Detector):
    name = "spy"
    received: list = []

    def score(self, *args, **kwargs):
        type(self).received.append((args, kwargs))
        return torch.zeros(len(args[1]))


class ShadowSpy(Spy):
    name = "shadow_spy"
    requires = ("shadows",)


def test_detector_receives_no_membership_or_shadow_information(tiny_protocol):
    p = tiny_protocol
    Spy.received = []
    out = p.evaluate(Spy(), ["target-02"])
    (args, kwargs), = Spy.received
    assert kwargs == {} and len(args) == 2  # (model, samples): no shadows argument at all
    model, samples = args
    assert isinstance(model, ClassifierModel) and isinstance(samples, LabeledSamples)
    # the samples: ids, inputs and the *training* labels (noise included) of the target's members only
    assert set(vars(samples)) == {"ids", "inputs", "labels"}
    rows = p.membership[2].nonzero().flatten()
    assert samples.ids == [p.pool.ids[i] for i in rows.tolist()]
    assert torch.equal(samples.labels, p.pool.labels[rows])
    assert not torch.equal(samples.labels, p.pool.clean_labels[rows])  # noise is planted, not revealed
    # the model is the early checkpoint, not the final one
    final = p.setup.view(p.setup.load(p.paths[2] / "final.pt"))
    assert not torch.allclose(model.class_logits(samples), final.class_logits(samples))
    assert out[0]["auc"] == 0.5  # a constant detector is at chance

    ShadowSpy.received = []
    p.evaluate(ShadowSpy(), ["target-02"])
    (args, kwargs), = ShadowSpy.received
    shadows = args[2]
    assert isinstance(shadows, ShadowModels) and len(shadows.models) == p.params.k == 7
    assert torch.equal(shadows.membership, p.membership[[0, 1, 3, 4, 5, 6, 7]][:, rows])


def test_noise_is_memorized_more_and_detectors_beat_chance(tiny_protocol):
    from memeval_methods.loss_detector import LossDetector
    from memeval_methods.psmi import PSMI

    p = tiny_protocol
    # a mislabelled member is memorized far more often than a clean one (75 % vs 10 % here)
    assert p.report["noise_memorized_rate"] > 4 * p.report["clean_memorized_rate"]
    items = p.items()
    for det in (LossDetector(), PSMI(PSMI.Config(directions=200))):
        aucs = [m["auc"] for m in p.evaluate(det, items) if m["auc"] is not None]
        assert sum(aucs) / len(aucs) > 0.65, det.name  # chance is 0.5


def test_detector_that_edits_weights_is_an_error(tiny_protocol):
    class Vandal(Detector):
        name = "vandal"

        def score(self, model, samples, shadows=None):
            with torch.no_grad():
                next(model.module.parameters()).add_(1.0)
            return torch.zeros(len(samples))

    p = tiny_protocol
    with pytest.raises(RuntimeError, match="modified the model"):
        p.evaluate(Vandal(), ["target-00"])
    # the damaged copy is dropped: the next detector gets the checkpoint as saved
    fresh = p.setup.view(p.setup.load(p.paths[0] / "early.pt"))
    assert p._early(0).fingerprint() == fresh.fingerprint()


KILL_SCRIPT = """
import sys
from memeval.classifiers import DigitsSetup
from memeval.shadows import Train, train_pool
setup = DigitsSetup(seed=0, n_models=4, noise=0.05, pool_size=300, hidden=(32,),
                    train=Train(epochs=int(sys.argv[1]), batch_size=16, lr=3e-3))
train_pool(setup, progress=False)
"""


def test_killed_pool_resumes_without_retraining_finished_models(tmp_path, monkeypatch):
    from memeval import shadows as sh
    from memeval.classifiers import DigitsSetup
    from memeval.organisms import cache

    monkeypatch.setenv("MEMEVAL_CACHE", str(tmp_path))
    epochs = 100
    setup = DigitsSetup(seed=0, n_models=4, noise=0.05, pool_size=300, hidden=(32,),
                        train=sh.Train(epochs=epochs, batch_size=16, lr=3e-3))
    entries = [cache.entry_dir(sh.member_key(setup, i), sh.detection_cache()) for i in range(4)]
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(epochs)], env={**os.environ})
    deadline = time.time() + 120
    while time.time() < deadline and not any(cache.is_complete(e) for e in entries):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = [i for i, e in enumerate(entries) if cache.is_complete(e)]
    assert 1 <= len(finished) < 4, finished
    stamps = {i: (entries[i] / "final.pt").stat().st_mtime_ns for i in finished}

    trained = []
    real = sh._train_into
    monkeypatch.setattr(sh, "_train_into", lambda s, i, out: (trained.append(i), real(s, i, out)))
    paths = sh.train_pool(setup, progress=False)
    assert sorted(trained) == [i for i in range(4) if i not in finished]
    assert all((entries[i] / "final.pt").stat().st_mtime_ns == stamps[i] for i in finished)
    assert [p.resolve() for p in paths] == [e.resolve() for e in entries]
    assert not list(sh.detection_cache().glob(".tmp-*"))  # the killed build's debris is gone


@pytest.mark.slow
def test_cli_run_and_leaderboard_mark_shadow_users_and_draw_roc_curves(tmp_path):
    """memeval runs the task end to end; the summary records early_lira's shadows; the site marks it and
    draws the ROC curves; re-running resumes (nothing rescored)."""
    import json

    path = _task_yaml(tmp_path, TINY, name="det_cli", data="{source: digits, pool: 400}")
    cmd = [sys.executable, "-m", "memeval.cli", "--methods", "all", "--tasks", "det_cli", "--include-path", str(path),
           "--output", str(tmp_path / "out")]
    env = {**os.environ, "MEMEVAL_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["methods"]["early_lira"]["requires"] == ["shadows"]
    assert "requires" not in summary["methods"]["psmi"]
    assert {e["method"] for e in summary["results"]} == {"psmi", "loss", "logit_gap", "mahalanobis", "early_lira"}
    assert all(e["n"] == 8 and e["errors"] == 0 for e in summary["results"])
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r2.returncode == 0 and (tmp_path / "out" / "results.jsonl").read_text().splitlines() == lines

    from memeval.leaderboard import build_site

    build_site([tmp_path / "out"], tmp_path / "site")
    page = (tmp_path / "site" / "tasks" / "det_cli.html").read_text()
    assert page.count("(uses shadows)") == 1 and "det_cli-roc.svg" in page
    assert (tmp_path / "site" / "plots" / "det_cli-roc.svg").read_text().startswith("<?xml")


@pytest.mark.slow
def test_organism_setup_fine_tunes_a_label_token_classifier(micro_organism, tmp_path):
    """The causal-LM setup on the micro organism: each prompt ends where the label token follows, the view
    gives per-layer features and the four label-token logits, and the final models fit the training labels."""
    from memeval.metrics import logit_gap as gap
    from memeval.protocols.detection import DetectionProtocol
    from memeval.tasks import parse_task

    path = tmp_path / "det_micro.yaml"
    path.write_text("task: det_micro\nversion: 1\nprotocol: detection\nmodel: organism:micro\n"
                    "data: {source: organism, pool: 64, max_tokens: 12}\n"
                    "params: {models: 5, epochs: 8, batch_size: 16, lr: 2.0e-3}\n")
    task = parse_task(path)
    proto = DetectionProtocol(task, DetectionProtocol.load_model(task, "cpu", torch.float32), 0)
    proto.prepare()
    rows = proto.membership[0].nonzero().flatten()
    samples = proto.pool.samples(rows)
    early = proto._early(0)
    assert early.num_classes == 4 and early.lm is not None
    h0, hl = early.features(samples, 0), early.features(samples, -1)
    assert h0.shape == hl.shape == (32, early.lm.hidden_size) and not torch.allclose(h0, hl)
    assert early.class_logits(samples).shape == (32, 4)
    # the prompt's next token is the label: the final model puts the training label first on most members
    final = proto.setup.view(proto.setup.load(proto.paths[0] / "final.pt"))
    assert float((gap(final.class_logits(samples), samples.labels) > 0).float().mean()) > 0.9
    from memeval_methods.psmi import PSMI

    for m in proto.evaluate(PSMI(PSMI.Config(directions=100)), ["target-00", "target-01"]):
        assert m["auc"] is None or 0 <= m["auc"] <= 1


def test_early_lira_on_final_checkpoints_reproduces_the_ground_truth(tiny_protocol, monkeypatch):
    """Given the final models instead of the early ones, early_lira computes the ground truth itself: AUC 1
    (a check of the shadows' membership plumbing); at the real early checkpoint it is below that."""
    from memeval.shadows import FINAL
    from memeval_methods.early_lira import EarlyLiRA

    p = tiny_protocol
    early = [m["auc"] for m in p.evaluate(EarlyLiRA(), ["target-00", "target-03"])]
    monkeypatch.setattr(p, "_early", lambda i: p.setup.view(p.setup.load(p.paths[i] / f"{FINAL}.pt")))
    final = [m["auc"] for m in p.evaluate(EarlyLiRA(), ["target-00", "target-03"])]
    assert final == [1.0, 1.0]
    assert all(e < 1.0 for e in early)


def test_readme_detector_example_runs(tiny_protocol):
    """The detector example of README's detection section, executed as written and scored."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**A-priori detection**"):readme.index("**Memorization prediction**")]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    scope: dict = {}
    exec(code, scope)
    metrics = tiny_protocol.evaluate(scope["Entropy"](), ["target-01"])[0]
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["precision@k"] is not None


def test_file_pool_reads_prompts_and_labels_and_names_a_bad_row(micro_organism, tmp_path):
    """source: file (the paper setups' format): one JSONL row per sample; the prompt's next token is the
    label; an unknown label is a one-line error naming the file and line. The setup pickles (for workers)."""
    import pickle

    from memeval.classifiers import LMSetup
    from memeval.shadows import Train

    path = tmp_path / "pool.jsonl"
    path.write_text("".join(f'{{"prompt": "Question {i}? Answer:", "label": "{"AB"[i % 2]}"}}\n' for i in range(12)))
    setup = LMSetup(seed=0, n_models=5, noise=0.0, train=Train(epochs=1, batch_size=4, lr=1e-3),
                    model="organism:micro", source="file", path=str(path), labels=("A", "B"), pool_size=0)
    pool = setup.pool()
    assert len(pool) == 12 and pool.labels.tolist() == [i % 2 for i in range(12)] and pool.num_classes == 2
    assert pickle.loads(pickle.dumps(setup)) == setup
    path.write_text(path.read_text() + '{"prompt": "Q? Answer:", "label": "C"}\n')
    bad = LMSetup(seed=1, n_models=5, noise=0.0, train=setup.train, model="organism:micro", source="file",
                  path=str(path), labels=("A", "B"), pool_size=0)
    with pytest.raises(UsageError, match=r"pool.jsonl:13: label 'C' is not one of \['A', 'B'\]"):
        bad.pool()
