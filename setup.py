"""Build hook (all other metadata is in pyproject.toml): record the git commit of the source tree inside the
built package as ``memeval/_build_commit.txt``, so that a non-editable install (``pip install .``) still
reports the commit in every result's provenance (``memeval.provenance.git_commit``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE = Path(__file__).resolve().parent


def source_commit() -> str | None:
    """HEAD of the source checkout, with ``-dirty`` if tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(SOURCE), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", str(SOURCE), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


class BuildPyWithCommit(build_py):
    def run(self) -> None:
        super().run()
        commit = source_commit()
        if commit:
            (Path(self.build_lib) / "memeval" / "_build_commit.txt").write_text(commit + "\n")


setup(cmdclass={"build_py": BuildPyWithCommit})
