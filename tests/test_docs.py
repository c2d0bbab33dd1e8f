"""Docs are executed: the files CONTRIBUTING.md quotes are the files CI installs and tests, and the commands
it shows for the example plugin are the ones `.ci/run` runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)


def blocks(doc: str) -> list[str]:
    return FENCE.findall((ROOT / doc).read_text())


def test_quoted_files_are_the_repository_files():
    quoted = [b for b in blocks("CONTRIBUTING.md") if re.match(r"# examples/\S+\n", b)]
    assert len(quoted) >= 3
    for block in quoted:
        first, _, body = block.partition("\n")
        path = ROOT / first.removeprefix("# ").strip()
        assert path.is_file(), path
        assert body.strip() in path.read_text(), f"CONTRIBUTING.md quotes {path} but differs from it"


def test_example_plugin_commands_run_in_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for b in blocks("CONTRIBUTING.md") for line in b.splitlines()
                if "examples/memeval-gradxact" in line and not line.startswith("#")
                and line.strip().startswith(("pip install", "python -m pytest"))]
    assert commands
    for command in commands:
        assert command.replace("pip install", "python -m pip install -q") in ci or command in ci, command


def test_readme_stability_command_reproduces_the_published_stability_json(tmp_path, monkeypatch):
    """README's `memeval leaderboard stability ...`, run as written on the committed result sets, writes the
    committed leaderboard/results/stability.json (what the site shows is what the published sets give)."""
    import json
    import shlex

    from memeval.cli import main

    (command,) = [line.strip() for b in blocks("README.md") for line in b.splitlines()
                  if line.strip().startswith("memeval leaderboard stability")]
    argv = shlex.split(command)[1:]
    published = ROOT / argv[argv.index("--out") + 1]
    argv[argv.index("--out") + 1] = str(tmp_path / "stability.json")
    monkeypatch.chdir(ROOT)
    assert main(argv) == 0
    assert json.loads((tmp_path / "stability.json").read_text()) == json.loads(published.read_text())
