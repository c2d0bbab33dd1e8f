"""Tables for people: the end-of-run summary and ``memeval ls``, never cut.

A cell too wide for a terminal wraps onto more lines (rich's ``fold`` overflow) instead of ending in "…";
output that is not a terminal (a pipe, a file, CI logs) is laid out at the width the table needs, so every
row stays on one line and can be grepped.
"""

from __future__ import annotations

import sys
from typing import Sequence

from rich.console import Console
from rich.table import Table


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                right: Sequence[str] = ()) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    if sys.stdout.isatty():
        console = Console()
    else:
        widths = [max([len(col)] + [len(str(r[i])) for r in rows]) for i, col in enumerate(columns)]
        console = Console(width=max(len(title), sum(widths) + 3 * len(columns) + 1), soft_wrap=False)
    console.print(table)
