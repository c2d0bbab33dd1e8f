"""The runner: scores every selected (method, task) pair with the guarantees of DESIGN §7.

- Methods whose kind the task's protocol does not accept are skipped with a note.
- Items are scored in batches; a batch that raises is re-run item by item so that only the failing
  items are recorded as errors. A NaN metric, or a method that changed the model's weights (detected by
  the weight fingerprint), is that item's error; the weights are then restored and the run goes on.
- Every item is appended to ``OUTPUT/results.jsonl`` as soon as it is scored; items already recorded with
  the same config hash are skipped, so re-running a command resumes it.
- ``--device cuda:0,cuda:1``, ``--workers N`` or ``--backend ray`` score batches in worker processes or Ray
  actors (:mod:`memeval.workers`); records come back to this process, the only writer.
- ``summary.json`` covers every pair recorded in the output directory under the current configs
  (:mod:`memeval.summary`).

:func:`execute` is the one entry point: the CLI and :func:`memeval.evaluate` both call it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from memeval.api import Method, build_config
from memeval.errors import UsageError, closest
from memeval.loading import parse_model_args, resolve_device, resolve_dtype
from memeval.models import NeuronModel
from memeval.plugins import Registry, get_registry, method_version
from memeval.protocols import Protocol
from memeval.provenance import run_metadata
from memeval.results import ResultsStore, write_json_atomic
from memeval.scoring import PairRunner
from memeval.summary import PairManifest, PairRecord, build_summary, print_summary
from memeval.tasks import Task, load_tasks, override_model, override_task, parse_task_overrides

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
    model: str | None = None  # --model: overrides the selected tasks' model
    model_args: str | dict[str, Any] | None = None  # --model-args k=v,...
    task_config: list[str] = field(default_factory=list)  # --task-config TASK.data.KEY=VALUE
    log_samples: bool = False  # --log-samples: greedy continuations before/after, per item
    progress: bool = True  # progress bars and the end-of-run table on stderr/stdout
    backend: str = "local"  # local | ray (memeval.workers)
    workers: int | None = None  # worker processes (local) or actors (ray); default: one per --device entry
    ray_address: str | None = None  # --ray-address (else RAY_ADDRESS, else a local Ray)
    argv: list[str] = field(default_factory=list)  # the command line, when run from it

    def to_argv(self) -> list[str]:
        """The ``memeval run`` arguments equivalent to these options (worker processes; provenance)."""
        out = ["run", "--methods", self.methods, "--tasks", self.tasks, "--output", str(self.output),
               "--device", self.device, "--dtype", self.dtype, "--seed", str(self.seed),
               "--batch-size", str(self.batch_size), "--split", self.split]
        out += ["--limit", str(self.limit)] if self.limit is not None else []
        out += [a for p in self.include_paths for a in ("--include-path", str(p))]
        out += [a for c in self.method_config for a in ("--method-config", c)]
        out += [a for c in self.task_config for a in ("--task-config", c)]
        out += ["--model", self.model] if self.model else []
        if self.model_args:
            args = self.model_args if isinstance(self.model_args, str) else \
                ",".join(f"{k}={v}" for k, v in self.model_args.items())
            out += ["--model-args", args]
        out += ["--log-samples"] if self.log_samples else []
        out += ["--backend", self.backend] if self.backend != "local" else []
        out += ["--workers", str(self.workers)] if self.workers else []
        out += ["--ray-address", self.ray_address] if self.ray_address else []
        return out

    def command(self) -> str:
        """The command line that gives these numbers (the one typed, or its equivalent from Python)."""
        return "memeval " + shlex.join(self.argv or self.to_argv())


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
# The whole run


class Runner:
    """The driver of a run (``worker=True``: only what a worker process needs to score jobs, no results store)."""

    def __init__(self, opts: RunOptions, worker: bool = False) -> None:
        self.opts = opts
        self.registry = get_registry()
        self.index = load_tasks(opts.include_paths, self.registry)
        self.task_overrides = parse_task_overrides(opts.task_config, self.index)
        self.model_args = parse_model_args(opts.model_args)
        self.tasks = [self.configured(t) for t in self.index.select(opts.tasks)]
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
        dtype = opts.dtype
        if "dtype" in self.model_args:
            if dtype not in ("auto", self.model_args["dtype"]):
                raise UsageError(f"--model-args dtype={self.model_args['dtype']} contradicts --dtype {dtype}")
            dtype = str(self.model_args["dtype"])
        self.dtype = resolve_dtype(dtype, self.device)
        if opts.backend not in ("local", "ray"):
            raise UsageError(f"--backend {opts.backend}: expected local or ray")
        if opts.workers is not None and opts.workers < 1:
            raise UsageError(f"--workers {opts.workers}: expected a positive integer")
        self.distributed = opts.backend == "ray" or (opts.workers or len(self.devices)) > 1
        if self.distributed and opts.model and opts.model.startswith("memory:"):
            raise UsageError("an in-memory model cannot be sharded over devices or workers (worker processes cannot "
                             "see it); save it with save_pretrained() and pass its directory")
        if worker:
            return
        self.store = ResultsStore(opts.output / "results.jsonl")
        self.meta = run_metadata(opts, self.device, self.dtype)  # at the start: the code that produced the numbers

    def configured(self, task: Task, task_config: dict[str, str] | None = None, model: str | None = None,
                   model_args: dict[str, Any] | None = None) -> Task:
        """``task`` with this run's --task-config and --model applied (or those given, for an earlier pair)."""
        overrides = self.task_overrides.get(task.name, {}) if task_config is None else task_config
        if overrides:
            task = override_task(task, overrides)
        model = self.opts.model if model is None else model
        if model:
            task = override_model(task, model, self.model_args if model_args is None else model_args, self.registry)
        if not task.model:
            raise UsageError(f"{task.path}: task '{task.name}' names no model (model: null); pass --model SPEC "
                             f"(hf:<repo>, a local directory, organism:<preset>)")
        return task

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
            why = protocol_cls.skip_reason(task, cls)
            if why:
                if self.opts.methods != "all":
                    console.print(f"[dim]note: {cls.name} skipped on {task.name}: {why}[/dim]")
                continue
            overrides = {**task.method_config.get(cls.name, {}), **self.overrides.get(cls.name, {})}
            where = f"{task.path}:{task.method_config_lines.get(cls.name, task.line)}"
            config = build_config(cls, overrides, where if cls.name not in self.overrides else "--method-config")
            version = method_version(cls.name, self.registry)
            pairs.append(Pair(cls, config, task, config_hash(task, cls.name, config, self.dtype, self.device, version)))
        return pairs

    def run(self) -> dict[str, Any]:
        """Score every pending item (here, or in workers: :mod:`memeval.workers`), then write and return the summary."""
        current: list[PairRecord] = self._run_distributed() if self.distributed else self._run_here()
        manifest = PairManifest(self.opts.output / "pairs.json")
        summary = build_summary(self.meta, current, manifest, self.store, self._current_hash,
                                lambda text: console.print(f"[dim]{text}[/dim]"))
        manifest.save()
        write_json_atomic(self.opts.output / "summary.json", summary)
        if self.opts.progress:
            print_summary(summary)
        return summary

    def _run_here(self) -> list[PairRecord]:
        current: list[PairRecord] = []
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
                current.append(self._pair_record(pair, primary, directions, len(protocol.items())))
        return current

    def _run_distributed(self) -> list[PairRecord]:
        """The same items scored by worker processes or Ray actors; every record comes back here and is
        written by this process alone, so resume, failure isolation and the summary are unchanged."""
        from memeval.workers import Job, make_pool

        current, jobs, bars = [], [], {}
        with make_pool(self.opts, self.devices, self.tasks) as pool, \
                Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         TimeRemainingColumn(), console=console, disable=not self.opts.progress) as progress:
            for task in self.tasks:
                pairs = self.pairs_for(task)
                if not pairs:
                    continue
                prep = progress.add_task(f"{task.name}: preparing {task.protocol} in a worker", total=None)
                info = pool.describe(task.name)
                progress.update(prep, description=f"{task.name}: prepared", total=1, completed=1)
                items = info["dev_items"] if self.opts.split == "dev" else info["items"]
                if not items:
                    raise UsageError(f"{task.path}: task '{task.name}' has no {self.opts.split} items")
                for pair in pairs:
                    pair.items = items[: self.opts.limit] if self.opts.limit else items
                    name = pair.method_cls.name
                    pending = [i for i in pair.items if not self.store.has((name, task.name, pair.config_hash, i))]
                    bars[(name, task.name)] = progress.add_task(f"{name} · {task.name}", total=len(pair.items),
                                                               completed=len(pair.items) - len(pending))
                    jobs += [Job(task.name, name, pair.config_hash, tuple(pending[i : i + self.opts.batch_size]))
                             for i in range(0, len(pending), self.opts.batch_size)]
                    current.append(self._pair_record(pair, info["primary"], info["directions"], info["n_items"]))
            writers = {}
            for records in pool.run(jobs):
                for rec in records:
                    if self.store.has((rec["method"], rec["task"], rec["config_hash"], rec["item"])):
                        continue  # a retried job's item already recorded: never twice
                    key = (rec["method"], rec["task"])
                    if key not in writers:
                        samples = (self.opts.output / "samples" / f"{key[0]}__{key[1]}.jsonl") if self.opts.log_samples else None
                        writers[key] = PairRunner(None, None, self.store, None, samples)
                    writers[key].record(rec)
                    progress.advance(bars[key])
        return current

    def _pair_record(self, pair: Pair, primary: str, directions: dict[str, bool], n_items: int) -> PairRecord:
        """What :mod:`memeval.summary` needs to summarize this pair now and in later runs."""
        cls, task = pair.method_cls, pair.task
        info = self.registry.methods[cls.name]
        return {
            "method": cls.name, "task": task.name, "config_hash": pair.config_hash,
            "method_config": dataclasses.asdict(pair.config), "items": pair.items, "primary": primary,
            "directions": directions, "limited": self.meta["limited"],
            "task_config": self.task_overrides.get(task.name, {}), "model": self.opts.model,
            "model_args": self.model_args,
            "method_meta": {"kind": cls.kind, "summary": cls.summary, "paper": cls.paper, "plugin": info.dist,
                            "version": method_version(cls.name, self.registry),
                            **({"requires": list(cls.requires)} if cls.requires else {})},
            "task_meta": {"protocol": task.protocol, "model": task.model, "version": task.version, "tags": task.tags,
                          "description": task.description, "primary": primary, "higher_is_better": directions,
                          "n_items": n_items,
                          **({"params": dataclasses.asdict(task.params)} if dataclasses.is_dataclass(task.params) else {})},
            "run": {k: self.meta[k] for k in ("date", "command", "git_commit", "memeval_version")},
        }

    def _current_hash(self, record: PairRecord) -> str | None:
        """The config hash the current code gives an earlier run's pair (None: method or task is gone)."""
        if record["method"] not in self.registry.methods or record["task"] not in self.index.tasks:
            return None
        task = self.configured(self.index.tasks[record["task"]], record.get("task_config") or {},
                               record.get("model") or "", record.get("model_args") or {})
        cls = self.registry.methods[record["method"]].obj
        config = build_config(cls, record["method_config"], "pairs.json")
        return config_hash(task, cls.name, config, self.dtype, self.device, method_version(cls.name, self.registry))

    def _prepare(self, task: Task):
        seed = task.seed + self.opts.seed
        protocol_cls = self.registry.protocols[task.protocol].obj
        protocol_cls.check_task(task)
        with Progress(TextColumn("[bold]{task.fields[name]}[/bold]: {task.description}"), BarColumn(),
                      TimeElapsedColumn(), console=console, transient=False, disable=not self.opts.progress) as progress:
            bar = progress.add_task(f"loading {task.model}", total=None, name=task.name)
            model = protocol_cls.load_model(task, self.device, self.dtype)
            progress.update(bar, description=f"preparing {task.protocol}")
            protocol = protocol_cls(task, model, seed)
            protocol.on_status = lambda text: progress.update(bar, description=f"preparing {task.protocol}: {text}")
            protocol.log_samples = self.opts.log_samples
            protocol.prepare()
            progress.update(bar, description=f"prepared {task.protocol} on {task.model}", total=1, completed=1)
        directions = {**protocol.metrics(), **task.higher_is_better}
        primary = task.primary or protocol.primary_metric()
        if primary not in directions:
            raise UsageError(f"{task.path}: metrics.primary '{primary}' is not a metric of this task"
                             f"{closest(primary, list(directions))}")
        return protocol, model, directions, primary

    def _run_pair(self, pair: Pair, protocol: Protocol, model: NeuronModel) -> None:
        items = pair.items
        name = pair.method_cls.name
        pending = [i for i in items if not self.store.has((name, pair.task.name, pair.config_hash, i))]

        def restore() -> None:
            fresh = protocol.load_model(pair.task, self.device, self.dtype)
            model.hf.load_state_dict(fresh.hf.state_dict())

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=False, disable=not self.opts.progress) as progress:
            bar = progress.add_task(f"{name} · {pair.task.name}", total=len(items), completed=len(items) - len(pending))
            samples = (self.opts.output / "samples" / f"{name}__{pair.task.name}.jsonl") if self.opts.log_samples else None
            PairRunner(protocol, model, self.store, restore, samples).run(pair, pending, self.opts.batch_size,
                                                                          self.opts.seed, progress, bar)


def exit_code(summary: dict[str, Any]) -> int:
    """0 when every item was scored, 1 when some failed (their errors are in results.jsonl)."""
    return 1 if any(e["errors"] for e in summary.get("results", [])) else 0


def execute(opts: RunOptions) -> dict[str, Any]:
    """Run ``opts`` and return the summary (the schema of ``summary.json``)."""
    return Runner(opts).run()
