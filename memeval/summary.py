"""``summary.json``: one entry per (method, task) pair recorded in an output directory under the current configs.

Every run writes ``OUTPUT/pairs.json``: for each pair it scored, what is needed to summarize that pair again
later (config hash, method config, the task overrides and model given then, the items, the primary metric and
its direction, the method and task descriptions, the run's provenance). ``summary.json`` then covers the pairs
of this run and those of earlier runs into the same directory whose config hash the current code still gives
(task YAML with the overrides recorded then, method code and version, dtype, device). A pair whose method or
task changed since is left out with a note naming it, never shown with numbers the current code would not give.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from memeval.results import ResultsStore, aggregate, write_json_atomic

PairRecord = dict[str, Any]


class PairManifest:
    """``OUTPUT/pairs.json``: the pair records of every run into one output directory, keyed by method and task."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: dict[str, PairRecord] = {}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self.records = {k: v for k, v in loaded.items() if isinstance(v, dict)}
            except (ValueError, AttributeError):
                self.records = {}  # unreadable: earlier pairs are not summarized, their results stay recorded

    @staticmethod
    def key(method: str, task: str) -> str:
        return f"{method} · {task}"

    def put(self, record: PairRecord) -> None:
        self.records[self.key(record["method"], record["task"])] = record

    def save(self) -> None:
        write_json_atomic(self.path, self.records)


def summarize_pair(record: PairRecord, store: ResultsStore) -> dict[str, Any]:
    """The summary entry of one pair: its config and the aggregate of its recorded items, in item order."""
    order = {item: i for i, item in enumerate(record["items"])}
    records = [r for r in store.for_pair(record["method"], record["task"], record["config_hash"]) if r["item"] in order]
    return {"method": record["method"], "task": record["task"], "kind": record["method_meta"]["kind"],
            "config_hash": record["config_hash"], "method_config": record["method_config"],
            **aggregate(sorted(records, key=lambda r: order[r["item"]]), record["primary"], record["directions"])}


def build_summary(meta: dict[str, Any], current: list[PairRecord], manifest: PairManifest, store: ResultsStore,
                  current_hash: Callable[[PairRecord], str | None], note: Callable[[str], None]) -> dict[str, Any]:
    """The summary of ``current`` pairs plus the manifest's earlier pairs that are still current.

    ``current_hash(record)`` is the config hash the current code gives the recorded pair (None when its method
    or task no longer exists); an earlier pair is kept when it equals the recorded one."""
    chosen = {manifest.key(r["method"], r["task"]): r for r in current}
    for key, record in manifest.records.items():
        if key in chosen:
            continue
        try:
            now = current_hash(record)
        except Exception:  # a task or method that can no longer be built is not current
            now = None
        if now == record.get("config_hash"):
            chosen[key] = record
        else:
            note(f"summary: {key} left out: its method or task changed since it was scored (re-run it to include it)")
    for record in current:
        manifest.put(record)
    records = list(chosen.values())
    limited = any(r.get("limited") for r in records)
    return {
        "meta": {**meta, "limited": limited},
        "methods": {r["method"]: r["method_meta"] for r in records},
        "tasks": {r["task"]: r["task_meta"] for r in records},
        "results": [summarize_pair(r, store) for r in records],
    }


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run table: one row per (method, task) pair, names never cut (:mod:`memeval.tables`).
    ``s/item`` is the mean wall time per item (a batch's time divided among its items)."""
    from memeval.tables import print_table

    rows = []
    for e in summary["results"]:
        p = e["primary"]
        value = "—" if p["value"] is None else f"{p['value']:.4g} ± {p['stderr']:.2g}"
        arrow = "↑" if p["higher_is_better"] else "↓"
        rows.append([e["method"], e["task"], str(e["n"]), str(e["errors"]), f"{p['name']} {arrow}", value,
                     "—" if e["seconds_per_item"] is None else f"{e['seconds_per_item']:.3g}"])
    print_table("memeval summary", ["method", "task", "n", "errors", "primary metric", "value ± stderr", "s/item"],
                rows, right=("n", "errors", "s/item"))
