"""The example plugin's tests, as CONTRIBUTING.md shows them: the method on the micro model organism."""

from __future__ import annotations

import json

import torch

import memeval_gradxact
from memeval.api import Batch, TokenSequence
from memeval.cli import main
from memeval.testing import build_tiny_model

DEL_MICRO = """task: del_micro
version: 1
protocol: deletion
model: organism:micro
data: {source: organism, targets: 12, dev: 0, negatives: 10, ppl_sequences: 6, ppl_tokens: 48}
params: {ratios: [0.05, 0.2], skip_layers: []}
"""


def test_grad_x_act_runs_under_memeval_on_the_micro_organism(memeval_plugin, tmp_path):
    memeval_plugin(memeval_gradxact, "grad_x_act")  # does nothing once the package is installed
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "del_micro.yaml").write_text(DEL_MICRO)
    code = main(["--methods", "grad_x_act", "--tasks", "del_micro", "--include-path", str(tmp_path / "tasks"),
                 "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (entry,) = summary["results"]
    assert entry["n"] >= 2 and entry["errors"] == 0  # every memorized target of the organism scored
    assert entry["method_config"] == {"seed": 0, "absolute": True}
    version = summary["methods"]["grad_x_act"]["version"]  # the plugin's version and a digest of its code
    assert "+" in version


def test_a_neuron_that_carries_the_suffix_scores_highest(tmp_path):
    """A planted case: zeroing every down-projection column but one leaves a single neuron on the path to the
    logits, so it alone has a non-zero gradient x activation."""
    from memeval.loading import load_model

    model = load_model(str(build_tiny_model("gpt2", tmp_path / "m")))
    for layer in range(model.num_layers):
        w = torch.zeros_like(model.down_proj(layer))
        if layer == 1:
            w[:, 7] = model.down_proj(layer)[:, 7]
        model.set_down_proj(layer, w)
    seq = TokenSequence("s", tuple(range(3, 15)), 4)
    batch = Batch.from_sequences([seq], model.pad_id, model.device)
    scores = memeval_gradxact.GradTimesActivation(memeval_gradxact.GradTimesActivation.Config()).localize(model, batch)
    assert scores.shape == (1, model.num_layers, model.num_neurons)
    assert scores[0, 1].argmax().item() == 7 and scores[0, 1, 7] > 0
    assert torch.count_nonzero(scores[0, 1]) == 1 and torch.count_nonzero(scores[0, 0]) == 0
