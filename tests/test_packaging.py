"""A non-editable install ships the built-in methods, tasks and leaderboard assets inside the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_contains_methods_tasks_and_site_assets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("memeval-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_yaml = {f"memeval_tasks/{p.relative_to(ROOT / 'tasks')}" for p in (ROOT / "tasks").rglob("*.yaml")}
    assert shipped_yaml and shipped_yaml <= names
    shipped_methods = {f"memeval_methods/{p.name}" for p in (ROOT / "methods").glob("*.py")}
    assert shipped_methods <= names
    assert any(n.startswith("memeval/leaderboard/templates/") for n in names)
    assert not any(n.startswith("methods/") or n.startswith("tasks/") for n in names)  # no bare top-level modules
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[memeval]" in text and "memeval_methods.random_localizer" in text
    # the source's commit travels inside the wheel, for provenance without a git checkout
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        recorded = zipfile.ZipFile(wheel).read("memeval/_build_commit.txt").decode().strip()
        assert recorded.removesuffix("-dirty") == head.stdout.strip()
