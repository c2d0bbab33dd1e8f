"""Hostile input ends in one line on stderr and exit code 2, never a traceback (issue #11)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from memeval.cli import main
from tests.test_runner import run, toy  # noqa: F401  (the toy task fixture)


def test_task_yaml_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"task: x\nversion: 1\ndescription: caf\xe9\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}: not UTF-8 text" in err


def test_output_naming_an_existing_file_is_one_line(toy, capsys):  # noqa: F811
    tasks, out = toy
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("not a directory")
    assert run(tasks, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exists and is not a directory" in err
    assert out.read_text() == "not a directory"


def test_summary_is_world_readable_like_results(toy):  # noqa: F811
    tasks, out = toy
    old = os.umask(0o022)
    try:
        assert run(tasks, out, "toy_oracle") == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out / "summary.json", out / "results.jsonl")}
    assert modes == {"summary.json": 0o644, "results.jsonl": 0o644}


def test_listing_into_a_closed_pipe_is_quiet():
    """`memeval ls methods --json | head -1`: the reader has closed the pipe before memeval writes (``true``
    exits at once, memeval's imports take seconds); no BrokenPipeError traceback."""
    proc = subprocess.run(f"{sys.executable} -m memeval.cli ls methods --json | true", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
