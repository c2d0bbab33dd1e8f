"""Scoring in worker processes and Ray actors: the same per-item numbers as one process, a worker killed mid-item
costs nothing and records nothing twice, shared artefacts are built once, and a missing Ray is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memeval.cli import main
from memeval.testing import ToyPlugin

PLUGIN = '''
import os
from pathlib import Path

from memeval import hookimpl
from memeval.testing import ToyLocalizer, ToyProtocol


class DiesOnce(ToyLocalizer):
    """The oracle, except that the first process to reach item seq5 dies in the middle of it (as an OOM kill)."""

    name = "toy_dies_once"

    def localize(self, model, batch):
        if "seq5" in batch.item_ids:
            try:
                fd = os.open(os.environ["TOY_DIE_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)
        return super().localize(model, batch)


@hookimpl
def memeval_protocols():
    return [ToyProtocol]


@hookimpl
def memeval_methods():
    return [ToyLocalizer, DiesOnce]
'''


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "memeval_dying_plugin.py").write_text(PLUGIN)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_task.yaml").write_text(f"task: toy_task\nversion: 1\nprotocol: toy\nmodel: {tiny_model_dir('gpt2')}\n"
                                         "data: {sequences: 10, length: 12, prefix: 4}\nparams: {k: 0.1}\n")
    env = {**os.environ, "PYTHONPATH": str(plugin), "MEMEVAL_PLUGIN_MODULES": "memeval_dying_plugin",
           "TOY_DIE_MARKER": str(tmp_path / "died")}
    return tasks, env, tmp_path


def run(setup, out: str, methods: str, *extra: str) -> subprocess.CompletedProcess:
    tasks, env, tmp = setup
    cmd = [sys.executable, "-m", "memeval.cli", "--methods", methods, "--tasks", "toy_task", "--include-path",
           str(tasks), "--output", str(tmp / out), "--device", "cpu", "--batch-size", "2", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def per_item(path: Path) -> dict[tuple[str, str], dict]:
    records = [json.loads(l) for l in (path / "results.jsonl").read_text().splitlines()]
    keys = [(r["method"], r["item"]) for r in records]
    assert len(keys) == len(set(keys)), "an item was recorded twice"
    return {k: r["metrics"] for k, r in zip(keys, records)}


def check_against_one_process(setup, out: str, *extra: str) -> None:
    tmp = setup[2]
    ref = run(setup, "ref", "toy_oracle,random")
    assert ref.returncode == 0, ref.stderr[-800:]
    got = run(setup, out, "toy_dies_once,random", *extra)
    assert got.returncode == 0, got.stderr[-800:]
    assert (tmp / "died").exists(), "the worker was meant to die on seq5"
    expected, results = per_item(tmp / "ref"), per_item(tmp / out)
    assert len(results) == len(expected) == 20
    for (method, item), metrics in expected.items():
        assert results[("toy_dies_once" if method == "toy_oracle" else method, item)] == metrics, (method, item)
    summary = json.loads((tmp / out / "summary.json").read_text())
    assert {e["method"]: e["n"] for e in summary["results"]} == {"toy_dies_once": 10, "random": 10}


@pytest.mark.slow
def test_local_workers_equal_one_process_after_a_worker_dies(setup):
    check_against_one_process(setup, "local", "--workers", "2")


@pytest.mark.slow
def test_ray_backend_equals_one_process_after_an_actor_dies(setup):
    pytest.importorskip("ray")
    check_against_one_process(setup, "ray", "--backend", "ray", "--workers", "2")


def test_ray_backend_without_ray_is_one_line(memeval_plugin, tiny_model_dir, tmp_path, capsys, monkeypatch):
    memeval_plugin(ToyPlugin(), "toy")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "toy.yaml").write_text(f"task: toy_task\nversion: 1\nprotocol: toy\nmodel: {tiny_model_dir('gpt2')}\n")
    code = main(["--methods", "toy_oracle", "--tasks", "toy_task", "--include-path", str(tmp_path / "t"),
                 "--output", str(tmp_path / "o"), "--backend", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and "--backend ray needs Ray: pip install 'memeval[ray]'" in err
    assert len([l for l in err.splitlines() if l.strip()]) == 1


BUILD_ONCE = '''
import sys, time
from pathlib import Path
from memeval.organisms import cache

def build(tmp):
    with open(sys.argv[2], "a") as fh:
        fh.write("built\\n")
    time.sleep(1.5)
    (tmp / "weights").write_text("w")

print(cache.build_atomically("samekey", build, Path(sys.argv[1])))
'''


def test_two_workers_asking_for_the_same_artefact_build_it_once(tmp_path):
    """Organisms, shadow models and shipped organisms go through build_atomically: two processes asking for the
    same uncached entry at once get one build; the second waits on the lock and reuses it."""
    script = tmp_path / "build.py"
    script.write_text(BUILD_ONCE)
    log = tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(log)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert log.read_text() == "built\n"
    assert outs[0] == outs[1] and (Path(outs[0]) / "weights").read_text() == "w"
