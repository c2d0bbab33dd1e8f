"""The results store: one JSON line per (method, task, item), and the per-pair summary (DESIGN §7).

``results.jsonl`` records are ``{"method", "task", "item", "config_hash", "seconds", "metrics"}`` or, for
an item that failed, ``{..., "error": "<message>"}``. Each record is written with one ``write`` call on a
file opened with ``O_APPEND`` and fsynced, so a run killed at any moment leaves at most a partial last
line, which the next run cuts off before appending. Several processes (one per device) may append to
the same file: each line is written whole.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from memeval.errors import UsageError
from memeval.metrics import mean_stderr

Key = tuple[str, str, str, str]  # (method, task, config_hash, item)


def record_key(rec: dict[str, Any]) -> Key:
    return rec["method"], rec["task"], rec["config_hash"], rec["item"]


class ResultsStore:
    """Append-only per-item records with an index for resume."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: dict[Key, dict[str, Any]] = {}
        for folder in (self.path.parent, *self.path.parent.parents):
            if folder.exists() and not folder.is_dir():
                raise UsageError(f"--output {self.path.parent}: {folder} exists and is not a directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a partial last line from a killed run: drop it
            with open(self.path, "r+b") as f:
                f.truncate(end)
            data = data[:end]
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = record_key(rec)
            except (ValueError, KeyError, TypeError):
                continue  # a corrupt line never breaks a run; it is simply not counted
            # The first record of an item wins, except that a success replaces an earlier error.
            if key not in self.records or ("error" in self.records[key] and "metrics" in rec):
                self.records[key] = rec

    def has(self, key: Key) -> bool:
        return key in self.records

    def append(self, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec, sort_keys=True, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        key = record_key(rec)
        if key not in self.records or "error" in self.records[key]:
            self.records[key] = rec

    def reload(self) -> None:
        self.records.clear()
        self._load()

    def for_pair(self, method: str, task: str, config_hash: str) -> list[dict[str, Any]]:
        return [r for k, r in self.records.items() if k[:3] == (method, task, config_hash)]


def aggregate(records: Iterable[dict[str, Any]], primary: str, directions: dict[str, bool]) -> dict[str, Any]:
    """Mean and standard error of every metric over the successful records (errors counted apart)."""
    records = list(records)
    ok = [r for r in records if "metrics" in r]
    errors = sum(1 for r in records if "error" in r)
    names = sorted({m for r in ok for m in r["metrics"]})
    metrics = {}
    for name in names:
        vals = [r["metrics"][name] for r in ok if r["metrics"].get(name) is not None]
        mean, se = mean_stderr(vals)
        metrics[name] = {"mean": _finite(mean), "stderr": _finite(se)}
    head = metrics.get(primary, {"mean": None, "stderr": None})
    seconds = [r.get("seconds", 0.0) for r in ok]
    return {
        "n": len(ok),
        "errors": errors,
        "seconds_per_item": round(sum(seconds) / len(seconds), 4) if seconds else None,
        "primary": {"name": primary, "value": head["mean"], "stderr": head["stderr"],
                    "higher_is_better": directions.get(primary, True)},
        "metrics": metrics,
    }


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else x


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place (mode 0644 less the umask,
    like any file the process creates; ``mkstemp`` alone would leave 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
