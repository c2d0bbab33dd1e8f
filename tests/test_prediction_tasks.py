"""Memorization prediction tasks: bad YAML values are one-line errors (k + ℓ longer than the sequences, an
unknown checkpoint, an empty split), Chen et al.'s per-score sampling, per-duplication-group metrics and the
majority-class floor computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memeval.api import TokenSequence
from memeval.cli import main
from memeval.metrics import majority_token_accuracy, token_accuracy
from memeval.protocols.prediction import per_score_sample


def B(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.bool)


def write_task(folder: Path, data: str, params: str = "{splits: 1}", name: str = "pred_bad") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(f"task: {name}\nversion: 1\nprotocol: prediction\nmodel: organism:micro\n"
                                         f"data: {data}\nparams: {params}\n")
    return folder


@pytest.mark.parametrize("data, message", [
    ("{source: organism, prefix_tokens: 40, suffix_tokens: 32}", "40 + 32 = 72 exceeds the 48 tokens"),
    ("{source: organism, feature_model: checkpoint@0.3}", "has checkpoints at 0.1, 0.25, 0.5, 1"),
    ("{source: organism, feature_model: checkpoint@early}", "expected checkpoint@<fraction of training>"),
    ("{source: organism, suffix_tokens: 0}", "suffix_tokens must be a positive number"),
])
def test_bad_values_are_one_line_errors_before_any_model_loads(tmp_path, capsys, data, message):
    tasks = write_task(tmp_path / "tasks", data)
    code = main(["validate", str(tasks)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_an_empty_split_is_a_one_line_error(micro_organism, tmp_path, capsys):
    # 10 planted + 6 ordinary sequences: 0.9 · 16 = 14 train, int(0.05 · 16) = 0 validation
    tasks = write_task(tmp_path / "tasks", "{source: organism, ordinary: 6}",
                       "{splits: 1, fractions: [0.9, 0.05, 0.05]}")
    code = main(["--methods", "loss_threshold", "--tasks", "pred_bad", "--include-path", str(tasks),
                 "--output", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "leave the validation split empty with 16 sequences" in err
    assert next(line for line in err.splitlines() if "error" in line).startswith("memeval: error: ")
    assert err.count("memeval: error") == 1 and "Traceback" not in err, err


def test_majority_floor_and_group_accuracy_by_hand():
    labels = [B(1, 1, 1, 1), B(1, 0, 0, 0), B(0, 0, 0, 0)]
    # 5 matching tokens of 12: the majority class (mismatch) is right on 7/12 (not 5/12, the matching class,
    # nor the per-sequence majority, which would be right on 4 + 3 + 4 = 11/12)
    assert majority_token_accuracy(labels) == pytest.approx(7 / 12)
    probs = [torch.full((4,), 0.9), torch.full((4,), 0.1), torch.full((4,), 0.1)]
    assert token_accuracy(probs[:1], labels[:1]) == 1.0 and token_accuracy(probs[1:2], labels[1:2]) == 0.75


def test_per_score_sample_keeps_at_most_n_per_value_of_m_and_is_seeded():
    seqs = [TokenSequence(f"s{i}", (1, 2, 3, 4, 5), 1) for i in range(30)]
    hits = [i % 3 for i in range(20)] + [4] * 10  # M = 0, 1/4, 2/4 (about 7 each) and 1 (10)
    truth = {s.id: torch.tensor([j < h for j in range(4)]) for s, h in zip(seqs, hits)}
    out = per_score_sample(seqs, truth, 5, seed=0)
    counts = {h: sum(1 for s in out if int(truth[s.id].sum()) == h) for h in (0, 1, 2, 4)}
    assert counts == {0: 5, 1: 5, 2: 5, 4: 5}
    assert [s.id for s in out] == [s.id for s in per_score_sample(seqs, truth, 5, seed=0)]
    assert [s.id for s in out] != [s.id for s in per_score_sample(seqs, truth, 5, seed=1)]
