"""Validation of memeval result sets (``summary.json`` + ``results.jsonl``) before they are published.

A result set that fails validation raises :class:`memeval.errors.UsageError` with one line
``<file>: <field>: <what is expected>``; nothing is rendered from it.

Rules (the contract of the runner's output, DESIGN §7-§8):

- schema: required keys and types of ``meta``, ``methods``, ``tasks``, ``results`` and of every line of
  ``results.jsonl``;
- provenance: ``meta.memeval_version``, ``meta.git_commit`` (a git hash), ``meta.device``, ``meta.dtype``
  and ``meta.date`` (ISO 8601) are present;
- ``meta.limited`` must be ``false``: runs made with ``--limit`` are rejected, never ranked;
- every summary result names a method and a task described in the same file, its primary metric is the
  task's primary, and its ``n`` equals the number of metric records in ``results.jsonl`` for the same
  (method, task, config_hash) (distinct items, counted as the runner's store does); records of other config hashes (stale records left by a resumed run with
  another configuration) are ignored;
- if the task records ``n_items``, ``n + errors`` equals it (a complete run);
- one configuration per (method, task) in a set.

``meta.git_commit`` may carry the runner's ``-dirty`` suffix (shown as is on the site); ``unknown`` is rejected.

A result whose ``errors`` is greater than 0 is *not* rejected: it is kept, shown, and excluded from the
ranking with a note ("not ranked: k errored items"). The same holds for a result without a primary value.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from memeval.errors import UsageError

SUMMARY = "summary.json"
RECORDS = "results.jsonl"
PROVENANCE = ("memeval_version", "git_commit", "device", "dtype", "date")
_COMMIT = re.compile(r"^[0-9a-fA-F]{7,40}(-dirty)?$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_@.=\-]*$")


@dataclass
class ResultSet:
    """One validated result set."""

    path: Path
    meta: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    tasks: dict[str, dict[str, Any]]
    results: list[dict[str, Any]]
    date: datetime
    records: int = 0
    notes: list[str] = field(default_factory=list)
    # (method, task, config_hash) -> item (as JSON) -> that item's metrics, from the record the store counts
    item_metrics: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def records_path(self) -> Path:
        return self.path / RECORDS


def _key(k: str) -> str:
    """A dict key as it appears in a field path: ``.name`` or ``["odd name"]``."""
    return f".{k}" if _IDENT.match(k) else f"[{json.dumps(k)}]"


def _tname(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


class _Checker:
    """Type checks that raise ``UsageError("<file>: <field>: expected ..., got ...")``."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, where: str, what: str) -> None:
        raise UsageError(f"{self.file}: {where}: {what}")

    def get(self, obj: dict, key: str, where: str, kind: str, *, required: bool = True,
            nullable: bool = False) -> Any:
        path = f"{where}{_key(key)}" if where else key
        if key not in obj:
            if required:
                self.fail(path, f"required field is missing (expected {kind})")
            return None
        return self.check(obj[key], path, kind, nullable=nullable)

    def check(self, v: Any, path: str, kind: str, *, nullable: bool = False) -> Any:
        if v is None and nullable:
            return None
        ok = {
            "a string": isinstance(v, str),
            "a non-empty string": isinstance(v, str) and v.strip() != "",
            "an integer": isinstance(v, int) and not isinstance(v, bool),
            "a non-negative integer": isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "a number": isinstance(v, (int, float)) and not isinstance(v, bool),
            "a boolean": isinstance(v, bool),
            "an object": isinstance(v, dict),
            "a list": isinstance(v, list),
            "a list of strings": isinstance(v, list) and all(isinstance(x, str) for x in v),
            "an integer or a string": isinstance(v, (int, str)) and not isinstance(v, bool),
        }[kind]
        if not ok:
            self.fail(path, f"expected {kind}{' or null' if nullable else ''}, got {_tname(v)}"
                      + (f" {json.dumps(v)[:40]}" if isinstance(v, (str, int, float)) and not isinstance(v, bool) else ""))
        return v


def parse_date(s: str) -> datetime | None:
    try:
        d = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_result_set(path: Path) -> ResultSet:
    """Read and validate the result set in directory ``path``; raise ``UsageError`` on the first problem."""
    path = Path(path)
    sfile, rfile = path / SUMMARY, path / RECORDS
    for f in (sfile, rfile):
        if not f.is_file():
            raise UsageError(f"{f}: file: missing (a result set is a directory with {SUMMARY} and {RECORDS})")
    c = _Checker(sfile)
    try:
        doc = json.loads(sfile.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{sfile}: (document): expected valid JSON ({str(e).splitlines()[0]})") from None
    c.check(doc, "(document)", "an object")

    # --- meta and provenance
    meta = c.get(doc, "meta", "", "an object")
    for k in PROVENANCE:
        if k not in meta or meta[k] is None or (isinstance(meta[k], str) and not meta[k].strip()):
            c.fail(f"meta.{k}", "required provenance field is missing (expected a non-empty string)")
        c.get(meta, k, "meta", "a non-empty string")
    if not _COMMIT.match(meta["git_commit"]):
        c.fail("meta.git_commit", f"expected a git commit hash (7-40 hex digits), got {json.dumps(meta['git_commit'])[:50]}")
    date = parse_date(meta["date"])
    if date is None:
        c.fail("meta.date", f"expected an ISO 8601 date such as 2026-11-23T18:00:00+00:00, got {json.dumps(meta['date'])[:50]}")
    limited = c.get(meta, "limited", "meta", "a boolean")
    if limited:
        c.fail("meta.limited", "expected false: runs made with --limit are never published or ranked")
    c.get(meta, "limit", "meta", "an integer", required=False, nullable=True)
    for k in ("seed", "batch_size"):
        c.get(meta, k, "meta", "an integer", required=False, nullable=True)
    for k in ("command", "hardware", "python", "torch"):
        c.get(meta, k, "meta", "a string", required=False, nullable=True)

    # --- methods
    methods = c.get(doc, "methods", "", "an object")
    for name, m in methods.items():
        where = f"methods{_key(name)}"
        c.check(m, where, "an object")
        c.get(m, "kind", where, "a non-empty string")
        for k in ("summary", "paper", "plugin", "version"):
            c.get(m, k, where, "a string", required=False, nullable=True)
        c.get(m, "requires", where, "a list of strings", required=False)  # privileged inputs, e.g. ["shadows"]

    # --- tasks
    tasks = c.get(doc, "tasks", "", "an object")
    for name, t in tasks.items():
        where = f"tasks{_key(name)}"
        c.check(t, where, "an object")
        c.get(t, "protocol", where, "a non-empty string")
        c.get(t, "model", where, "a non-empty string")
        c.get(t, "version", where, "an integer or a string")
        c.get(t, "tags", where, "a list of strings", required=False)
        c.get(t, "description", where, "a string", required=False, nullable=True)
        primary = c.get(t, "primary", where, "a non-empty string")
        c.get(t, "n_items", where, "a non-negative integer", required=False, nullable=True)
        hib = c.get(t, "higher_is_better", where, "an object")
        for mk, mv in hib.items():
            c.check(mv, f"{where}.higher_is_better{_key(mk)}", "a boolean")
        if primary not in hib:
            c.fail(f"{where}.higher_is_better", f"expected an entry for the primary metric {json.dumps(primary)}")

    # --- results
    results = c.get(doc, "results", "", "a list")
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(results):
        where = f"results[{i}]"
        c.check(r, where, "an object")
        method = c.get(r, "method", where, "a non-empty string")
        task = c.get(r, "task", where, "a non-empty string")
        if method not in methods:
            c.fail(f"{where}.method", f"expected a method described in \"methods\", got {json.dumps(method)[:60]}")
        if task not in tasks:
            c.fail(f"{where}.task", f"expected a task described in \"tasks\", got {json.dumps(task)[:60]}")
        if (method, task) in seen:
            c.fail(where, f"expected one result per (method, task); results[{seen[method, task]}] has the same pair")
        seen[method, task] = i
        c.get(r, "kind", where, "a non-empty string")
        c.get(r, "config_hash", where, "a non-empty string")
        c.get(r, "method_config", where, "an object")
        c.get(r, "n", where, "a non-negative integer")
        c.get(r, "errors", where, "a non-negative integer")
        c.get(r, "seconds_per_item", where, "a number", required=False, nullable=True)
        p = c.get(r, "primary", where, "an object")
        pname = c.get(p, "name", f"{where}.primary", "a non-empty string")
        if pname != tasks[task]["primary"]:
            c.fail(f"{where}.primary.name", f"expected the task's primary metric {json.dumps(tasks[task]['primary'])}, got {json.dumps(pname)[:60]}")
        c.get(p, "value", f"{where}.primary", "a number", nullable=True)
        c.get(p, "stderr", f"{where}.primary", "a number", required=False, nullable=True)
        phib = c.get(p, "higher_is_better", f"{where}.primary", "a boolean")
        if phib != tasks[task]["higher_is_better"][pname]:
            c.fail(f"{where}.primary.higher_is_better", f"expected {json.dumps(tasks[task]['higher_is_better'][pname])} as in tasks{_key(task)}.higher_is_better")
        metrics = c.get(r, "metrics", where, "an object")
        for mk, mv in metrics.items():
            mw = f"{where}.metrics{_key(mk)}"
            c.check(mv, mw, "an object")
            c.get(mv, "mean", mw, "a number", nullable=True)
            c.get(mv, "stderr", mw, "a number", required=False, nullable=True)

    # --- records
    rc = _Checker(rfile)
    counts: dict[tuple[str, str, str], int] = {}
    items: set[tuple[str, str, str, str]] = set()
    per_item: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    nrec = 0
    with rfile.open(encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"line {ln}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rc.fail(where, f"expected one JSON object per line ({str(e).splitlines()[0]})")
            rc.check(rec, where, "an object")
            nrec += 1
            m = rc.get(rec, "method", where, "a non-empty string")
            t = rc.get(rec, "task", where, "a non-empty string")
            h = rc.get(rec, "config_hash", where, "a non-empty string")
            item = rc.get(rec, "item", where, "an integer or a string")
            rc.get(rec, "seconds", where, "a number", required=False, nullable=True)
            if "metrics" in rec:
                mets = rc.get(rec, "metrics", where, "an object")
                for mk, mv in mets.items():
                    rc.check(mv, f"{where}.metrics{_key(mk)}", "a number", nullable=True)
                # as the runner's store: one success per item counts (a success replaces an earlier error)
                ik = (m, t, h, json.dumps(item))
                if ik not in items:
                    items.add(ik)
                    counts[(m, t, h)] = counts.get((m, t, h), 0) + 1
                    per_item.setdefault((m, t, h), {})[ik[3]] = mets
            elif "error" in rec:
                rc.get(rec, "error", where, "a string")
            else:
                rc.fail(where, "expected a \"metrics\" object or an \"error\" string")

    for i, r in enumerate(results):
        found = counts.get((r["method"], r["task"], r["config_hash"]), 0)
        if found != r["n"]:
            c.fail(f"results[{i}].n", f"expected {r['n']} to equal the {found} metric records in {rfile.name} "
                   f"for method {json.dumps(r['method'])[:40]}, task {json.dumps(r['task'])[:40]}, config_hash {r['config_hash'][:12]}")
        total = tasks[r["task"]].get("n_items")
        if total is not None and r["n"] + r["errors"] != total:
            c.fail(f"results[{i}].n", f"expected n + errors = {total} (tasks{_key(r['task'])}.n_items), got "
                   f"{r['n']} + {r['errors']}: an incomplete run is not published")

    return ResultSet(path=path, meta=meta, methods=methods, tasks=tasks, results=results, date=date, records=nrec,
                     item_metrics=per_item)


def find_result_sets(root: Path) -> list[Path]:
    """``root`` itself if it holds ``summary.json``, else every directory below it that does (sorted)."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: path: does not exist (expected a result set directory)")
    if not root.is_dir():
        raise UsageError(f"{root}: path: expected a directory holding {SUMMARY} and {RECORDS}")
    if (root / SUMMARY).exists():
        return [root]
    found = []
    for p in sorted(root.rglob(SUMMARY)):
        rel = p.parent.relative_to(root).parts
        # skip hidden directories and the raw-file copies inside a site built by memeval
        if any(part.startswith(".") for part in rel) or any(
                (root.joinpath(*rel[:i]) / ".memeval-site").exists() for i in range(len(rel) + 1)):
            continue
        found.append(p.parent)
    if not found:
        raise UsageError(f"{root}: {SUMMARY}: expected a result set here or in a subdirectory, found none")
    return found
