"""The runner: scores every selected (method, task) pair with the guarantees of DESIGN §7.

- Methods whose kind the task's protocol does not accept are skipped with a note.
- Items are scored in batches; a batch that raises is re-run item by item so that only the failing
  items are recorded as errors. A NaN metric, or a method that changed the model's weights (detected by
  the weight fingerprint), is that item's error; the weights are then restored and the run goes on.
- Every item is appended to ``OUTPUT/results.jsonl`` as soon as it is scored; items already recorded with
  the same config hash are skipped, so re-running a command resumes it.
- ``--device cuda:0,cuda:1`` starts one worker process per device, each taking every n-th item.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from memeval.api import Method, build_config
from memeval.errors import UsageError, closest
from memeval.models import NeuronModel, load_model, resolve_device, resolve_dtype
from memeval.plugins import Registry, get_registry, method_version
from memeval.protocols import Protocol
from memeval.provenance import run_metadata
from memeval.results import ResultsStore, aggregate, write_json_atomic
from memeval.tasks import Task, load_tasks

console = Console(stderr=True)


@dataclass
class RunOptions:
    methods: str
    tasks: str
    output: Path = Path("results")
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    batch_size: int = 8
    include_paths: list[Path] = field(default_factory=list)
    method_config: list[str] = field(default_factory=list)
    split: str = "test"  # test | dev (dev items are for tuning hyperparameters, never ranked)
    shard: tuple[int, int] | None = None  # (index, count) for a worker process
    argv: list[str] = field(default_factory=list)


@dataclass
class Pair:
    method_cls: type[Method]
    config: Any
    task: Task
    config_hash: str
    items: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Selection


def select_methods(spec: str, registry: Registry) -> list[type[Method]]:
    """``all``, a method kind (``localizer``…) or a comma list of names."""
    chosen: list[str] = []
    kinds = {p.obj.kind for p in registry.methods.values()}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "all":
            chosen.extend(sorted(registry.methods))
        elif part in registry.methods:
            chosen.append(part)
        elif part.rstrip("s") in kinds:
            chosen.extend(sorted(n for n, p in registry.methods.items() if p.obj.kind == part.rstrip("s")))
        else:
            raise UsageError(f"unknown method '{part}'{closest(part, list(registry.methods))}; "
                             f"`memeval ls methods` lists them")
    if not chosen:
        raise UsageError("--methods: no method named")
    return [registry.methods[n].obj for n in dict.fromkeys(chosen)]


def parse_method_overrides(items: list[str], registry: Registry) -> dict[str, dict[str, str]]:
    """``name.key=value`` strings from ``--method-config`` → {method: {key: value}} (values still strings)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        target, eq, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not eq or not dot or not name or not key:
            raise UsageError(f"--method-config '{item}': expected METHOD.KEY=VALUE, e.g. slimming.lr=1e-3")
        registry.method(name)
        out.setdefault(name, {})[key] = value
    for name, overrides in out.items():
        build_config(registry.method(name), overrides, "--method-config")
    return out


def config_hash(task: Task, method_name: str, config: Any, dtype: torch.dtype, device: torch.device,
                method_version: str = "") -> str:
    """Hash of everything that determines a pair's numbers (batch size and --limit excluded: they don't),
    the method's code included (:func:`memeval.plugins.method_version`)."""
    blob = json.dumps({"task": task.definition(), "method": method_name, "config": dataclasses.asdict(config),
                       "method_version": method_version, "dtype": str(dtype), "device": device.type},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Scoring one pair


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
    """Scores the pending items of one pair on a prepared protocol."""

    def __init__(self, protocol: Protocol, model: NeuronModel, store: ResultsStore, restore) -> None:
        self.protocol, self.model, self.store, self.restore = protocol, model, store, restore

    def run(self, pair: Pair, pending: list[str], batch_size: int, seed: int, progress: Progress, bar) -> int:
        method = pair.method_cls(pair.config)
        reference = self.model.fingerprint()
        failed = 0
        for start in range(0, len(pending), batch_size):
            scored = list(self._score(method, pending[start : start + batch_size], seed))
            if self.model.fingerprint() != reference:
                self.restore()
                scored = [(item, None, "the method modified the model's weights (fingerprint changed)", s)
                          for item, _, _, s in scored]
            for item, metrics, error, seconds in scored:
                rec = {"method": pair.method_cls.name, "task": pair.task.name, "item": item,
                       "config_hash": pair.config_hash, "seconds": round(seconds, 4)}
                rec.update({"error": error} if error else {"metrics": metrics})
                failed += error is not None
                self.store.append(rec)
                progress.advance(bar)
        return failed

    def _score(self, method: Method, batch: list[str], seed: int):
        """(item, metrics, error, seconds) per item; a failing batch is retried item by item."""
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
            yield batch[0], None, _first_line(e), time.perf_counter() - t0
            return
        per_item = (time.perf_counter() - t0) / len(batch)
        for item, metrics in zip(batch, results):
            yield item, metrics, _check_metrics(metrics), per_item


# ---------------------------------------------------------------------------------------------
# The whole run


class Runner:
    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.registry = get_registry()
        self.index = load_tasks(opts.include_paths, self.registry)
        self.tasks = self.index.select(opts.tasks)
        self.methods = select_methods(opts.methods, self.registry)
        self.overrides = parse_method_overrides(opts.method_config, self.registry)
        if opts.limit is not None and opts.limit < 1:
            raise UsageError(f"--limit {opts.limit}: expected a positive number of items")
        if opts.batch_size < 1:
            raise UsageError(f"--batch-size {opts.batch_size}: expected a positive integer")
        self.devices = [d.strip() for d in opts.device.split(",") if d.strip()] or ["auto"]
        for d in self.devices:
            resolve_device(d)
        self.device = resolve_device(self.devices[0])
        self.dtype = resolve_dtype(opts.dtype, self.device)
        self.store = ResultsStore(opts.output / "results.jsonl")
        self.meta = run_metadata(opts, self.device, self.dtype)  # at the start: the code that produced the numbers

    def pairs_for(self, task: Task) -> list[Pair]:
        protocol_cls = self.registry.protocols[task.protocol].obj
        pairs = []
        for cls in self.methods:
            accepts = protocol_cls.accepts_for(task)
            if cls.kind not in accepts:
                if self.opts.methods != "all":
                    console.print(f"[dim]note: {cls.name} ({cls.kind}) skipped on {task.name}: it takes "
                                  f"{', '.join(accepts)}[/dim]")
                continue
            overrides = {**task.method_config.get(cls.name, {}), **self.overrides.get(cls.name, {})}
            where = f"{task.path}:{task.method_config_lines.get(cls.name, task.line)}"
            config = build_config(cls, overrides, where if cls.name not in self.overrides else "--method-config")
            version = method_version(cls.name, self.registry)
            pairs.append(Pair(cls, config, task, config_hash(task, cls.name, config, self.dtype, self.device, version)))
        return pairs

    def run(self) -> int:
        if len(self.devices) > 1 and self.opts.shard is None:
            return self._run_sharded()
        summary_entries = []
        methods_meta, tasks_meta = {}, {}
        for task in self.tasks:
            pairs = self.pairs_for(task)
            if not pairs:
                continue
            protocol, model, directions, primary = self._prepare(task)
            for pair in pairs:
                items = protocol.dev_items() if self.opts.split == "dev" else protocol.items()
                if not items:
                    raise UsageError(f"{task.path}: task '{task.name}' has no {self.opts.split} items")
                pair.items = items[: self.opts.limit] if self.opts.limit else items
                self._run_pair(pair, protocol, model)
                summary_entries.append(self._summarize(pair, primary, directions))
                info = self.registry.methods[pair.method_cls.name]
                methods_meta[pair.method_cls.name] = {"kind": pair.method_cls.kind, "summary": pair.method_cls.summary,
                                                      "paper": pair.method_cls.paper, "plugin": info.dist,
                                                      "version": method_version(pair.method_cls.name, self.registry),
                                                      **({"requires": list(pair.method_cls.requires)}
                                                         if pair.method_cls.requires else {})}
            tasks_meta[task.name] = {"protocol": task.protocol, "model": task.model, "version": task.version,
                                     "tags": task.tags, "description": task.description, "primary": primary,
                                     "higher_is_better": directions, "n_items": len(protocol.items())}
        if self.opts.shard is not None:
            return 0
        summary = {"meta": self.meta, "methods": methods_meta,
                   "tasks": tasks_meta, "results": summary_entries}
        write_json_atomic(self.opts.output / "summary.json", summary)
        print_summary(summary)
        return 1 if any(e["errors"] for e in summary_entries) else 0

    def _prepare(self, task: Task):
        seed = task.seed + self.opts.seed
        protocol_cls = self.registry.protocols[task.protocol].obj
        protocol_cls.check_task(task)
        console.print(f"[bold]{task.name}[/bold]: preparing {task.protocol} on {task.model}")
        model = protocol_cls.load_model(task, self.device, self.dtype)
        protocol = protocol_cls(task, model, seed)
        protocol.prepare()
        directions = {**protocol.metrics(), **task.higher_is_better}
        primary = task.primary or protocol.primary_metric()
        if primary not in directions:
            raise UsageError(f"{task.path}: metrics.primary '{primary}' is not a metric of this task"
                             f"{closest(primary, list(directions))}")
        return protocol, model, directions, primary

    def _run_pair(self, pair: Pair, protocol: Protocol, model: NeuronModel) -> None:
        items = pair.items
        if self.opts.shard is not None:
            index, count = self.opts.shard
            items = items[index::count]
        name = pair.method_cls.name
        pending = [i for i in items if not self.store.has((name, pair.task.name, pair.config_hash, i))]

        def restore() -> None:
            fresh = protocol.load_model(pair.task, self.device, self.dtype)
            model.hf.load_state_dict(fresh.hf.state_dict())

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=False) as progress:
            bar = progress.add_task(f"{name} · {pair.task.name}", total=len(items), completed=len(items) - len(pending))
            PairRunner(protocol, model, self.store, restore).run(pair, pending, self.opts.batch_size,
                                                                 self.opts.seed, progress, bar)

    def _summarize(self, pair: Pair, primary: str, directions: dict[str, bool]) -> dict[str, Any]:
        order = {item: i for i, item in enumerate(pair.items)}
        records = [r for r in self.store.for_pair(pair.method_cls.name, pair.task.name, pair.config_hash)
                   if r["item"] in order]
        return {"method": pair.method_cls.name, "task": pair.task.name, "kind": pair.method_cls.kind,
                "config_hash": pair.config_hash, "method_config": dataclasses.asdict(pair.config),
                **aggregate(sorted(records, key=lambda r: order[r["item"]]), primary, directions)}

    def _run_sharded(self) -> int:
        """One worker process per device over the same results file, then the summary."""
        argv = list(self.opts.argv)
        procs = []
        for index, device in enumerate(self.devices):
            cmd = [sys.executable, "-m", "memeval.cli", *argv, "--device", device, "--shard", f"{index}/{len(self.devices)}"]
            procs.append(subprocess.Popen(cmd))
        codes = [p.wait() for p in procs]
        if any(c == 2 for c in codes):
            return 2
        self.store.reload()
        self.devices = self.devices[:1]
        return self.run()


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run table: one row per (method, task) pair, names never cut (:mod:`memeval.tables`)."""
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
