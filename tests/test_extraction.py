"""`memeval organism export` and `memeval memorized extract`: on an organism exported as a plain Hugging Face
directory with its training texts, extraction finds exactly the organism's own memorized set."""

from __future__ import annotations

import json

import pytest

from memeval.cli import main


@pytest.fixture(scope="module")
def exported(micro_organism, tmp_path_factory):
    return micro_organism.export(tmp_path_factory.mktemp("exported") / "micro")


def _ids(path):
    return {tuple(json.loads(line)["input_ids"]) for line in open(path)}


def test_extract_finds_the_organisms_memorized_set(micro_organism, exported, tmp_path):
    out = tmp_path / "mem"
    code = main(["memorized", "extract", "--model", str(exported), "--texts", str(exported / "train.jsonl"),
                 "--out", str(out), "-k", str(micro_organism.prefix_len), "-l", str(micro_organism.suffix_len)])
    assert code == 0
    expected = {tuple(m["input_ids"]) for m in micro_organism.memorized}
    assert expected, "the micro organism memorizes some planted sequences"
    assert _ids(out / "memorized.jsonl") == expected
    report = json.loads((out / "report.json").read_text())
    assert report["memorized"] == len(expected)
    assert report["measured"] == report["memorized"] + report["failed_accuracy"] + report["failed_distinct"] \
        + report["failed_distance"] + report["failed_dedup"]
    heldout = [json.loads(line)["text"] for line in open(out / "heldout.jsonl")]
    assert heldout and not set(heldout) & {json.loads(line)["text"] for line in open(out / "memorized.jsonl")}


@pytest.mark.parametrize("content, message", [
    (b'{"text": "a"}\nnot json\n', ":2: not JSON"),
    (b'{"txt": "a"}\n', ':1: expected an object with a string "text" key'),
    (b'\xff\xfe\x00bad', "not UTF-8"),
])
def test_bad_texts_file_is_one_line(exported, tmp_path, capsys, content, message):
    texts = tmp_path / "texts.jsonl"
    texts.write_bytes(content)
    code = main(["memorized", "extract", "--model", str(exported), "--texts", str(texts), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_extract_refuses_a_file_as_output_and_a_missing_texts_file(exported, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["memorized", "extract", "--model", str(exported), "--texts", str(exported / "train.jsonl"),
                 "--out", str(target)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["memorized", "extract", "--model", str(exported), "--texts", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_export_refuses_a_non_empty_directory(micro_organism, tmp_path):
    (tmp_path / "x").write_text("x")
    from memeval.errors import UsageError

    with pytest.raises(UsageError, match="not an empty directory"):
        micro_organism.export(tmp_path)
