"""``memeval ls methods``, ``memeval ls tasks`` and ``memeval plugins``: tables, or JSON with ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

from memeval.plugins import get_registry
from memeval.tables import print_table
from memeval.tasks import load_tasks


def _emit(rows: list[dict], columns: list[str], title: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print_table(title, columns, [[", ".join(v) if isinstance(v, list) else str(v) for v in (row[c] for c in columns)]
                                 for row in rows])
    return 0


def list_methods(as_json: bool, include_paths: list[Path] | None = None) -> int:
    reg = get_registry()
    rows = [{"name": name, "kind": p.obj.kind, "summary": p.obj.summary, "plugin": p.dist, "paper": p.obj.paper}
            for name, p in sorted(reg.methods.items())]
    return _emit(rows, ["name", "kind", "summary", "plugin"], "methods", as_json)


def list_tasks(as_json: bool, include_paths: list[Path] | None = None) -> int:
    index = load_tasks(include_paths or [])
    rows = [{"name": t.name, "protocol": t.protocol, "model": t.model, "tags": t.tags, "version": t.version,
             "description": t.description, "file": str(t.path)}
            for t in sorted(index.tasks.values(), key=lambda t: t.name)]
    return _emit(rows, ["name", "protocol", "tags", "model", "version"], "tasks", as_json)


def list_plugins(as_json: bool) -> int:
    """One row per loaded plugin: its distribution and version, the methods and protocols it registers."""
    from importlib.metadata import PackageNotFoundError, version

    reg = get_registry()
    rows: dict[str, dict] = {}
    for kind, table in (("methods", reg.methods), ("protocols", reg.protocols)):
        for name, p in table.items():
            row = rows.setdefault(p.plugin, {"name": p.plugin, "distribution": p.dist, "version": "",
                                             "methods": [], "protocols": []})
            row[kind].append(name)
    for row in rows.values():
        try:
            row["version"] = version(row["distribution"])
        except (PackageNotFoundError, ValueError):
            row["version"] = "(not installed)"
        row["methods"].sort()
        row["protocols"].sort()
    ordered = sorted(rows.values(), key=lambda r: (r["distribution"], r["name"]))
    return _emit(ordered, ["name", "distribution", "version", "methods", "protocols"], "plugins", as_json)
