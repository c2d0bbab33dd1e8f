"""The a-priori detection protocol: metrics on hand-computed cases, LiRA and PSMI on closed-form cases,
the checkpoint rule, YAML validation, what a detector receives, and resuming a killed pool."""

from __future__ import annotations

import math
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
from memeval.metrics import fpr_at_tpr, local_lira, logit_gap, precision_at_k, roc_auc, tpr_at_fpr
from memeval.shadows import prediction_checkpoint

# ---------------------------------------------------------------------------------------------- metrics


def test_detection_metrics_hand_computed():
    # scores ranked: 0.9(+) 0.8(-) 0.7(+) 0.6(+) 0.5(-) 0.4(-): 3 positives, 3 negatives
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    g = torch.tensor([1, 0, 1, 1, 0, 0])
    # TPR reaches 2/3 at FPR 1/3, then 1 at FPR 1/3: the first threshold with TPR >= 0.75 has FPR 1/3
    # (linear interpolation between (0, 1/3) and (1/3, 1/3)... would also give 1/3; see the next case)
    assert fpr_at_tpr(s, g, 0.75) == pytest.approx(1 / 3)
    assert tpr_at_fpr(s, g, 0.01) == pytest.approx(1 / 3)  # only the top sample fits under FPR 1 %
    assert tpr_at_fpr(s, g, 1 / 3) == pytest.approx(1.0)
    assert precision_at_k(s, g, 3) == pytest.approx(2 / 3)
    assert roc_auc(s, g) == pytest.approx(7 / 9)  # pairs (pos > neg): 3 + 2 + 2 of 9
    # 4 positives, 4 negatives: TPR 0.75 needs 3 positives; ranked + - - + + - - +
    s2 = torch.arange(8, 0, -1).float()
    g2 = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1])
    # operating points: (0, .25) (.25, .25) (.5, .25) (.5, .5) (.5, .75) ... -> FPR 0.5 at TPR 0.75;
    # an interpolated curve between (.25, .25) and (.5, .75) would give 0.375
    assert fpr_at_tpr(s2, g2, 0.75) == pytest.approx(0.5)
    assert tpr_at_fpr(s2, g2, 0.3) == pytest.approx(0.25)


def test_precision_at_k_ties_and_degenerate_scores():
    g = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0])
    assert precision_at_k(torch.zeros(8), g, 2) == pytest.approx(2 / 8)  # constant score: the base rate
    # 1 above the cut, then a tie of 3 (1 positive) for 1 remaining place: (0 + 1 * 1/3) / 2
    s = torch.tensor([5.0, 1, 1, 1, 0, 0, 0, 0])
    g = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0])
    assert precision_at_k(s, g, 2) == pytest.approx((0 + 1 / 3) / 2)
    # a detector that does nothing: AUC 0.5, FPR@TPR .75 = 1, TPR@FPR 1 % = 0
    assert roc_auc(torch.zeros(8), g) == 0.5
    assert fpr_at_tpr(torch.zeros(8), g, 0.75) == 1.0
    assert tpr_at_fpr(torch.zeros(8), g, 0.01) == 0.0


def test_logit_gap_is_margin_of_the_training_label():
    z = torch.tensor([[1.0, 3.0, 2.0], [5.0, 1.0, 0.0]])
    assert logit_gap(z, torch.tensor([1, 1])).tolist() == [1.0, -4.0]  # 3 - 2; 1 - 5


# ---------------------------------------------------------------------------------------------- LiRA


def test_local_lira_known_in_out_distributions():
    # sample 0: IN values {4, 6} (mean 5, sd √2), OUT {-1, 1} (mean 0, sd √2); target value 5
    # log N(5; 5, √2) - log N(5; 0, √2) = 25 / (2 · 2) = 6.25
    shadows = torch.tensor([[4.0, 0.0], [6.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    member = torch.tensor([[1, 1], [1, 1], [0, 1], [0, 1]]).bool()  # sample 1: no OUT shadow
    out = local_lira(torch.tensor([5.0, 0.0]), shadows, member)
    assert out[0].item() == pytest.approx(6.25)
    assert math.isnan(out[1].item())
    # a target value far beyond both is clipped at ±100
    assert local_lira(torch.tensor([1e4]), shadows[:, :1], member[:, :1]).item() == 100.0


def test_local_lira_separates_members_of_gaussian_in_out():
    gen = torch.Generator().manual_seed(0)
    K, N = 512, 400
    member = torch.rand(K, N, generator=gen) < 0.5
    shadows = torch.randn(K, N, generator=gen) + 3.0 * member  # IN ~ N(3, 1), OUT ~ N(0, 1)
    target_in = torch.randn(N, generator=gen) + 3.0
    # the exact log ratio for N(3,1) vs N(0,1) at x is 3x - 4.5; the estimate converges to it (~256 IN/OUT)
    est = local_lira(target_in, shadows, member)
    exact = 3 * target_in - 4.5
    assert torch.corrcoef(torch.stack([est.float(), exact]))[0, 1] > 0.97
    assert (est - exact).abs().median() < 0.4
    # a non-member (drawn from OUT) gets a negative score in the large majority of cases
    assert (local_lira(torch.randn(N, generator=gen), shadows, member) < 0).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------- PSMI


def _psmi_module():
    from memeval_methods.psmi import adaptive_psmi, psmi

    return psmi, adaptive_psmi


def test_psmi_equals_pointwise_mutual_information_in_one_dimension():
    """d = 1: every direction is ±1, so PSMI is the exact pointwise MI of two Gaussian classes
    N(-1, 1) and N(+1, 1) with equal priors: log N(x; μ_y, 1) - log(½ N(x; -1, 1) + ½ N(x; 1, 1))."""
    psmi, _ = _psmi_module()
    gen = torch.Generator().manual_seed(1)
    n = 20000
    y = torch.randint(0, 2, (n,), generator=gen)
    x = (torch.randn(n, generator=gen) + (2.0 * y - 1.0)).double()
    est = psmi(x[:, None], y, 50, torch.Generator().manual_seed(0))
    mu = 2.0 * y - 1.0
    exact = (-0.5 * (x - mu) ** 2) - torch.logsumexp(torch.stack([-0.5 * (x + 1) ** 2, -0.5 * (x - 1) ** 2]), 0) \
        + math.log(2)
    err = (est - exact).abs()  # only the estimation error of μ_c, σ_c (n = 20,000) remains
    assert float(err.median()) < 0.01 and float(err.quantile(0.99)) < 0.05
    # its mean is the mutual information I(X; Y), by quadrature: ∫ Σ_y ½ p(x|y) pmi(x, y) dx
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    p0, p1 = torch.exp(-0.5 * (grid + 1) ** 2), torch.exp(-0.5 * (grid - 1) ** 2)
    pmi0, pmi1 = torch.log(2 * p0 / (p0 + p1)), torch.log(2 * p1 / (p0 + p1))
    mi = float(((0.5 * p0 * pmi0 + 0.5 * p1 * pmi1) / math.sqrt(2 * math.pi)).sum() * (grid[1] - grid[0]))
    assert float(est.mean()) == pytest.approx(mi, abs=0.01)
    assert 0.3 < mi < 0.5  # 0.4 nats here; a formula without the class priors would differ by log 2


def test_psmi_flags_a_mislabelled_sample_and_is_zero_without_signal():
    psmi, adaptive = _psmi_module()
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(300) % 3
    centres = torch.randn(3, 8, generator=gen) * 4
    x = centres[y] + torch.randn(300, 8, generator=gen)
    labels = y.clone()
    labels[:5] = (y[:5] + 1) % 3  # five training labels reassigned
    value = psmi(x, labels, 500, torch.Generator().manual_seed(0))
    assert set(torch.argsort(value)[:5].tolist()) == set(range(5))  # the five lowest PSMI
    noise = psmi(torch.randn(3000, 8, generator=gen), torch.arange(3000) % 3, 200, torch.Generator().manual_seed(0))
    assert abs(float(noise.mean())) < 0.01
    value2, used = adaptive(x, labels, torch.Generator().manual_seed(0))
    assert used >= 1000 and used % 500 == 0
    assert set(torch.argsort(value2)[:5].tolist()) == set(range(5))


def test_mahalanobis_finds_the_outlier():
    from memeval_methods.mahalanobis import mahalanobis_scores

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 5, generator=gen) @ torch.diag(torch.tensor([5.0, 1, 1, 0.2, 0.2]))
    x[7] = torch.tensor([0.0, 0, 0, 2.0, 0])  # small in Euclidean norm, 10 s.d. along a thin axis
    d = mahalanobis_scores(x, dims=100)
    assert int(d.argmax()) == 7
    assert int(x.norm(dim=1).argmax()) != 7  # a Euclidean distance would not find it


# ---------------------------------------------------------------------------------------------- the rule


def test_prediction_checkpoint_rule():
    # drops: 50 %, 90 %, 96 %, 99.5 %: closest to 95 % is the third checkpoint; minus one = the second
    assert prediction_checkpoint([0.1, 0.2, 0.3, 0.4], [2.0, 1.0, 0.2, 0.08, 0.01]) == 1
    # closest is the first checkpoint: "minus one" would be the untrained model -> the first checkpoint
    assert prediction_checkpoint([0.1, 0.2], [2.0, 0.1, 0.0]) == 0


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
    section = readme[readme.index("**A-priori detection**"):readme.index("## Model organisms")]
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
