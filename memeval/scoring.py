"""Scoring the items of one (method, task) pair on a prepared protocol: batches, per-item failure isolation,
the weight fingerprint check and restore, and the records (DESIGN §7). Used by the runner and by workers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import Progress

from memeval.api import Method
from memeval.models import NeuronModel
from memeval.protocols import Protocol
from memeval.results import ResultsStore

if TYPE_CHECKING:
    from memeval.runner import Pair



def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _check_metrics(metrics: dict[str, Any]) -> str | None:
    for name, value in metrics.items():
        if value is None:
            continue
        if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
            return f"metric '{name}' is {value!r}, not a finite number"
    return None


class PairRunner:
    """Scores the pending items of one pair on a prepared protocol.

    Each record's ``seconds`` is the wall time of the batch the item was scored in divided by the batch's
    item count, and ``batch_items`` says how many items shared it (1: the item's own time)."""

    def __init__(self, protocol: Protocol, model: NeuronModel, store: ResultsStore | None, restore,
                 samples_path: Path | None = None) -> None:
        self.protocol, self.model, self.store, self.restore = protocol, model, store, restore
        self.samples_path = samples_path

    def run(self, pair: Pair, pending: list[str], batch_size: int, seed: int, progress: Progress, bar) -> int:
        method = pair.method_cls(pair.config)
        failed = 0
        for start in range(0, len(pending), batch_size):
            for rec in self.score_batch(method, pair, pending[start : start + batch_size], seed):
                failed += self.record(rec)
                progress.advance(bar)
        return failed

    def score_batch(self, method: Method, pair: Pair, batch: list[str], seed: int) -> list[dict[str, Any]]:
        """The records of one batch (``samples`` kept in them for :meth:`record`), weights checked after it."""
        reference = self.model.fingerprint()
        scored = list(self._score(method, batch, seed))
        if self.model.fingerprint() != reference:
            self.restore()
            scored = [(item, None, "the method modified the model's weights (fingerprint changed)", s, n)
                      for item, _, _, s, n in scored]
        out = []
        for item, metrics, error, seconds, shared in scored:
            rec = {"method": pair.method_cls.name, "task": pair.task.name, "item": item,
                   "config_hash": pair.config_hash, "seconds": round(seconds, 4), "batch_items": shared}
            samples = metrics.pop("samples", None) if metrics else None
            rec.update({"error": error} if error else {"metrics": metrics})
            if samples is not None:
                rec["samples"] = samples
            out.append(rec)
        return out

    def record(self, rec: dict[str, Any]) -> bool:
        """Append one record to the store (its samples to the samples file); True when it is an error."""
        samples = rec.pop("samples", None)
        if samples is not None and self.samples_path is not None:
            self._write_samples({k: rec[k] for k in ("method", "task", "item", "config_hash")}, samples)
        self.store.append(rec)
        return "error" in rec

    def _write_samples(self, key: dict[str, str], samples: Any) -> None:
        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.samples_path, "a") as fh:
            fh.write(json.dumps({**key, "samples": samples}, ensure_ascii=False) + "\n")

    def _score(self, method: Method, batch: list[str], seed: int):
        """(item, metrics, error, seconds, batch_items) per item; a failing batch is retried item by item."""
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        try:
            results = self.protocol.evaluate(method, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"protocol returned {len(results)} results for {len(batch)} items")
        except Exception as e:  # isolate the failure to the items that cause it
            if len(batch) > 1:
                for item in batch:
                    yield from self._score(method, [item], seed)
                return
            yield batch[0], None, _first_line(e), time.perf_counter() - t0, 1
            return
        per_item = (time.perf_counter() - t0) / len(batch)
        for item, metrics in zip(batch, results):
            numbers = {k: v for k, v in metrics.items() if k != "samples"}
            yield item, metrics, _check_metrics(numbers), per_item, len(batch)
