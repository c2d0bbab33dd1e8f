"""The runner end to end with the toy protocol: scores, batching, resume, failure isolation, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memeval.cli import main
from memeval.testing import ToyPlugin

TOY_PLUGIN_MODULE = """
from memeval.testing import ToyProtocol, ToyLocalizer
from memeval import hookimpl

@hookimpl
def memeval_protocols():
    return [ToyProtocol]

@hookimpl
def memeval_methods():
    return [ToyLocalizer]
"""


def write_task(folder: Path, model_dir: Path, name: str = "toy_task", sequences: int = 6, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\nversion: 1\nprotocol: toy\nmodel: {model_dir}\ntags: [toys]\n"
                    f"data: {{sequences: {sequences}, length: 12, prefix: 4}}\nparams: {{k: 0.1}}\n{extra}")
    return folder


@pytest.fixture
def toy(memeval_plugin, tiny_model_dir, tmp_path):
    memeval_plugin(ToyPlugin(), "toy")
    tasks = write_task(tmp_path / "tasks", tiny_model_dir("gpt2"))
    return tasks, tmp_path / "out"


def run(tasks: Path, out: Path, *extra: str) -> int:
    return main(["--methods", extra[0] if extra else "toy_oracle,random", "--tasks", "toy_task",
                 "--include-path", str(tasks), "--output", str(out), "--device", "cpu", *extra[1:]])


def subprocess_setup(tmp_path: Path, model_dir: Path, sequences: int) -> tuple[Path, dict[str, str]]:
    """A toy task folder and the environment under which a ``python -m memeval.cli`` subprocess loads the
    toy plugin (an uninstalled module registered through MEMEVAL_PLUGIN_MODULES)."""
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "memeval_toy_plugin.py").write_text(TOY_PLUGIN_MODULE)
    tasks = write_task(tmp_path / "tasks", model_dir, sequences=sequences)
    return tasks, {**os.environ, "PYTHONPATH": str(plugin_dir), "MEMEVAL_PLUGIN_MODULES": "memeval_toy_plugin"}


def load(out: Path):
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    return summary, records


def test_oracle_scores_one_and_random_scores_about_k(toy):
    tasks, out = toy
    assert run(tasks, out) == 0
    summary, records = load(out)
    by_method = {e["method"]: e for e in summary["results"]}
    assert by_method["toy_oracle"]["primary"] == {"name": "recall", "value": 1.0, "stderr": 0.0, "higher_is_better": True}
    assert 0.0 <= by_method["random"]["primary"]["value"] < 0.35  # k = 0.1 of 80 neurons per layer
    assert by_method["random"]["n"] == 6 and by_method["random"]["errors"] == 0
    assert len(records) == 12
    meta = summary["meta"]
    assert meta["limited"] is False and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["memeval_version"] and meta["git_commit"]
    assert summary["tasks"]["toy_task"]["n_items"] == 6


def test_results_do_not_depend_on_batch_size(toy):
    tasks, out = toy
    run(tasks, out / "b1", "toy_oracle,random", "--batch-size", "1")
    run(tasks, out / "b4", "toy_oracle,random", "--batch-size", "4")
    _, rec1 = load(out / "b1")
    _, rec4 = load(out / "b4")
    key = lambda r: (r["method"], r["item"])
    m1 = {key(r): r["metrics"] for r in rec1}
    m4 = {key(r): r["metrics"] for r in rec4}
    assert m1.keys() == m4.keys()
    for k in m1:
        assert m1[k] == pytest.approx(m4[k], rel=1e-5)


def test_rerun_resumes_without_duplicates(toy):
    tasks, out = toy
    assert run(tasks, out, "random", "--limit", "3") == 0
    summary, records = load(out)
    assert summary["meta"]["limited"] is True and summary["results"][0]["n"] == 3
    assert run(tasks, out, "random") == 0  # scores only the three missing items
    summary, records = load(out)
    assert len(records) == 6 and len({r["item"] for r in records}) == 6
    assert summary["meta"]["limited"] is False and summary["results"][0]["n"] == 6


def test_partial_last_line_is_cut_and_the_item_rescored(toy):
    tasks, out = toy
    run(tasks, out, "random")
    path = out / "results.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:20])  # as if killed in the middle of a write
    assert run(tasks, out, "random") == 0
    _, records = load(out)
    assert sorted(r["item"] for r in records) == [f"seq{i}" for i in range(6)]


@pytest.mark.parametrize("mode, message", [
    ("raise_on:seq2", "RuntimeError: toy failure"),
    ("nan", "metric 'top_score' is nan"),
    ("modify", "modified the model's weights"),
])
def test_failures_are_isolated_recorded_and_exit_1(toy, mode, message):
    tasks, out = toy
    code = run(tasks, out, "toy_oracle", "--batch-size", "3", "--method-config", f"toy_oracle.mode={mode}")
    assert code == 1
    summary, records = load(out)
    errors = [r for r in records if "error" in r]
    assert errors and all(message in r["error"] for r in errors)
    if mode.startswith("raise_on"):  # only the failing item, not its batchmates
        assert [r["item"] for r in errors] == ["seq2"]
        assert summary["results"][0]["n"] == 5 and summary["results"][0]["errors"] == 1
    if mode == "modify":  # the weights were restored: the next item starts from the original model
        assert len(errors) == 6
        assert run(tasks, out / "clean", "random") == 0


def test_usage_errors_are_one_line_exit_2(toy, capsys):
    tasks, out = toy
    assert run(tasks, out, "toy_orcale") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'toy_orcale'" in err and "toy_oracle" in err
    assert main(["--methods", "random", "--tasks", "toy_tsk", "--include-path", str(tasks)]) == 2
    assert "did you mean: toy_task" in capsys.readouterr().err
    assert run(tasks, out, "random", "--method-config", "random.sed=3") == 2
    assert "no hyperparameter 'sed'" in capsys.readouterr().err
    assert run(tasks, out, "random", "--method-config", "toy_oracle.scale=big") == 2
    assert "expected a number" in capsys.readouterr().err
    assert main(["--methods", "random", "--tasks", "toy_task", "--include-path", str(tasks), "--bogus"]) == 2
    assert not (out / "results.jsonl").exists()


def test_cuda_requested_without_cuda_is_a_usage_error(toy, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    tasks, out = toy
    assert run(tasks, out, "random", "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tiny_model_dir, tmp_path):
    """A real process killed with SIGKILL while writing results; the re-run completes it exactly."""
    tasks, env = subprocess_setup(tmp_path, tiny_model_dir("gpt2"), sequences=40)

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "memeval.cli", "--methods", "random,toy_oracle", "--tasks", "toy_task",
                "--include-path", str(tasks), "--output", str(out), "--device", "cpu", "--batch-size", "1"]

    assert subprocess.run(cmd(tmp_path / "ref"), env=env, capture_output=True).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = killed / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not results.exists() or results.read_text().count("\n") < 25):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = results.read_text().count("\n")
    assert 0 < partial < 80, "the kill should land in the middle of the run"
    assert subprocess.run(cmd(killed), env=env, capture_output=True).returncode == 0
    ref_summary, ref_records = load(tmp_path / "ref")
    summary, records = load(killed)
    assert len(records) == 80 and len({(r["method"], r["item"]) for r in records}) == 80
    strip = lambda s: [{k: v for k, v in e.items() if k != "seconds_per_item"} for e in s["results"]]
    assert strip(summary) == strip(ref_summary)
    assert summary["tasks"] == ref_summary["tasks"]


@pytest.mark.slow
def test_two_devices_shard_items_across_worker_processes(tiny_model_dir, tmp_path):
    """``--device cpu,cpu`` runs one worker per device on alternate items; the numbers equal one process."""
    tasks, env = subprocess_setup(tmp_path, tiny_model_dir("gpt2"), sequences=8)
    base = [sys.executable, "-m", "memeval.cli", "--methods", "random,toy_oracle", "--tasks", "toy_task",
            "--include-path", str(tasks)]
    one = subprocess.run([*base, "--output", str(tmp_path / "one"), "--device", "cpu"], env=env, capture_output=True)
    two = subprocess.run([*base, "--output", str(tmp_path / "two"), "--device", "cpu,cpu"], env=env, capture_output=True)
    assert one.returncode == 0 and two.returncode == 0, two.stderr.decode()[-500:]
    s1, r1 = load(tmp_path / "one")
    s2, r2 = load(tmp_path / "two")
    assert len(r2) == 16 and len({(r["method"], r["item"]) for r in r2}) == 16
    strip = lambda s: [{k: v for k, v in e.items() if k != "seconds_per_item"} for e in s["results"]]
    assert strip(s1) == strip(s2)


VERSIONED_PLUGIN = '''
from memeval import hookimpl
from memeval.testing import ToyLocalizer


class Versioned(ToyLocalizer):
    name = "toy_versioned"
    version = "{version}"


@hookimpl
def memeval_methods():
    return [Versioned]
'''


def test_a_new_method_version_rescores_its_items(toy, memeval_plugin, tmp_path, monkeypatch):
    """Results are never reused when the method's code changed: the config hash carries its version."""
    import importlib

    from memeval import plugins

    tasks, out = toy
    monkeypatch.syspath_prepend(str(tmp_path))
    hashes = []
    for i, version in enumerate(("1.0", "2.0")):
        (tmp_path / f"memeval_versioned_{i}.py").write_text(VERSIONED_PLUGIN.format(version=version))
        module = importlib.import_module(f"memeval_versioned_{i}")
        memeval_plugin(module, f"versioned{i}")
        assert run(tasks, out, "toy_versioned") == 0
        plugins.unregister(f"versioned{i}")  # the next version replaces it, as a pip upgrade would
        summary, records = load(out)
        entry = [e for e in summary["results"] if e["method"] == "toy_versioned"][-1]
        assert summary["methods"]["toy_versioned"]["version"].startswith(f"{version}+")
        hashes.append(entry["config_hash"])
        assert sum(r["config_hash"] == entry["config_hash"] for r in records) == 6, "every item scored anew"
    assert hashes[0] != hashes[1]
