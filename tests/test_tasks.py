"""Task YAML validation: every error is one line `file:line: message`, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from memeval.cli import main
from memeval.errors import UsageError
from memeval.tasks import load_tasks, parse_task
from memeval.testing import ToyPlugin

GOOD = """task: t1
version: 2
protocol: toy
model: organism:micro
tags: [toys, small]
data: {sequences: 3}
params:
  k: 0.2
method_config:
  random: {seed: 7}
"""


@pytest.fixture(autouse=True)
def toy(memeval_plugin):
    memeval_plugin(ToyPlugin(), "toy")


def write(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_task_parses_into_typed_fields(tmp_path):
    task = parse_task(write(tmp_path, GOOD))
    assert (task.name, task.version, task.protocol, task.tags) == ("t1", 2, "toy", ["toys", "small"])
    assert task.data.sequences == 3 and task.data.length == 12  # default kept
    assert task.params.k == 0.2
    assert task.method_config == {"random": {"seed": 7}}


@pytest.mark.parametrize("edit, line, message", [
    (("tags: [toys, small]", "tagz: [toys]"), 5, "unknown key 'tagz' (did you mean: tags?)"),
    (("version: 2\n", ""), 1, "missing required key 'version'"),
    (("version: 2", "version: two"), 2, "version: expected an integer, got 'two'"),
    (("protocol: toy", "protocol: tyo"), 3, "unknown protocol 'tyo' (did you mean: toy?)"),
    (("  k: 0.2", "  k: [1]"), 8, "params.k: expected a number"),
    (("  k: 0.2", "  kk: 0.2"), 8, "unknown key 'params.kk'"),
    (("  random: {seed: 7}", "  random: {sed: 7}"), 10, "method 'random' has no hyperparameter 'sed'"),
    (("data: {sequences: 3}", "data: {sequences: 3"), 7, "invalid YAML"),
])
def test_each_error_is_one_line_with_file_and_line(tmp_path, edit, line, message):
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(UsageError) as err:
        parse_task(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:{line}: "), text
    assert message in text


def test_duplicate_task_names_name_both_files(tmp_path):
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD, "b.yaml")
    with pytest.raises(UsageError, match=r"b\.yaml:1: duplicate task name 't1' \(already defined in .*a\.yaml:1\)"):
        load_tasks([tmp_path])


def test_groups_come_from_tags(tmp_path):
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD.replace("task: t1", "task: t2").replace("[toys, small]", "[toys]"), "b.yaml")
    index = load_tasks([tmp_path])
    assert [t.name for t in index.select("toys")] == ["t1", "t2"]
    assert [t.name for t in index.select("small,t2")] == ["t1", "t2"]


def test_validate_command_exit_codes(tmp_path, capsys):
    good = write(tmp_path, GOOD, "good.yaml")
    assert main(["validate", str(good)]) == 0
    bad = write(tmp_path, GOOD.replace("version: 2", "version: x"), "bad.yaml")
    assert main(["validate", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and f"{bad}:2:" in err


def test_shipped_tasks_validate():
    root = Path(__file__).resolve().parent.parent / "tasks"
    assert main(["validate", "--schema-only", str(root)]) == 0


def test_list_overrides_parse_from_the_command_line_forms():
    from memeval.api import coerce_value

    for text in ("1,2", "[1, 2]", " [1,2] "):
        assert coerce_value(text, tuple[int, ...], "m.layers") == (1, 2)
    assert coerce_value("[]", tuple[int, ...], "m.layers") == ()
    assert coerce_value("0", list[int], "m.layers") == [0]
    with pytest.raises(UsageError, match=r"m\.layers: expected an integer, got 'a'"):
        coerce_value("[1, a]", tuple[int, ...], "m.layers")
