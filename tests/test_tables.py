"""Tables for people (`memeval ls`, the end-of-run summary): names are never cut, at any width."""

from __future__ import annotations

import re
import sys

from memeval.tables import print_table

ROWS = [["specificity_olmo2_1b_with_a_long_name", "specificity", "hf:allenai/OLMo-2-0425-1B"],
        ["specificity_olmo2_7b_with_a_long_name", "specificity", "hf:allenai/OLMo-2-1124-7B"]]


def test_not_a_terminal_keeps_every_row_whole_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    print_table("tasks", ["name", "protocol", "model"], ROWS)
    out = capsys.readouterr().out
    assert "…" not in out
    for name, _, model in ROWS:
        assert any(name in line and model in line for line in out.splitlines())


def test_a_narrow_terminal_wraps_instead_of_cutting(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    print_table("tasks", ["name", "protocol", "model"], ROWS)
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # a terminal gets colour codes
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 40
    first_column = "".join(line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│"))
    assert first_column == "".join(name for name, _, _ in ROWS)  # every character, in order
