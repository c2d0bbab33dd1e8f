"""Task YAMLs: strict loading, validation, groups and discovery (DESIGN §4).

A task file holds one mapping::

    task: del_organism                 # unique name (required)
    version: 1                         # bump when a change alters the numbers (required)
    protocol: deletion                 # a registered protocol (required)
    model: organism:tiny               # organism:<preset> | hf:<repo>[@rev] | a local path | null (required;
                                       #   null: the model is given with --model)
    model_args: {revision: main}       # keyword arguments for loading (see memeval.loading.MODEL_ARGS)
    tags: [del]                        # groups this task belongs to
    description: ...                   # one paragraph for listings and the leaderboard
    data: {...}                        # checked against the protocol's Data dataclass
    params: {...}                      # checked against the protocol's Params dataclass
    metrics: {primary: d_self_acc@0.005, higher_is_better: {...}}
    method_config: {slimming: {lambda_l1: 30000}}   # per-method hyperparameter overrides
    seed: 0

Every problem is reported as one line ``file:line: message`` (a :class:`UsageError`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from memeval.api import build_config, coerce_value
from memeval.errors import UsageError, closest
from memeval.plugins import Registry, get_registry

try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - libyaml missing
    from yaml import SafeLoader as _Loader

REQUIRED = ("task", "version", "protocol", "model")
OPTIONAL = ("tags", "description", "data", "params", "metrics", "method_config", "seed", "model_args")


@dataclass
class Task:
    name: str
    version: int
    protocol: str
    model: str
    path: Path
    line: int = 1
    tags: list[str] = field(default_factory=list)
    description: str = ""
    data: Any = None
    params: Any = None
    primary: str | None = None
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    method_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    method_config_lines: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    model_args: dict[str, Any] = field(default_factory=dict)

    def definition(self) -> dict[str, Any]:
        """What determines this task's numbers (hashed into every result's config hash)."""
        out = {
            "task": self.name, "version": self.version, "protocol": self.protocol, "model": self.model,
            "data": dataclasses.asdict(self.data) if dataclasses.is_dataclass(self.data) else self.data,
            "params": dataclasses.asdict(self.params) if dataclasses.is_dataclass(self.params) else self.params,
            "seed": self.seed,
        }
        if self.model_args:  # absent when empty, so tasks without them keep their hashes
            out["model_args"] = dict(sorted(self.model_args.items()))
        files = data_file_digests(self.data)
        if files:  # a data file that changed gives new numbers: its content is part of the definition
            out["data_files"] = files
        return out


def data_file_digests(data: Any) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of each existing file a ``data`` field ending in ``path`` names."""
    if not dataclasses.is_dataclass(data):
        return {}
    out = {}
    for f in dataclasses.fields(data):
        value = getattr(data, f.name)
        if f.name.endswith("path") and isinstance(value, str) and value:
            path = Path(os.path.expandvars(os.path.expanduser(value)))
            if path.is_file():
                st = path.stat()
                out[f.name] = _digest(str(path.resolve()), st.st_mtime_ns, st.st_size)
    return out


@functools.lru_cache(maxsize=256)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _Node:
    """A YAML value with the line it starts on (1-based) and, for mappings, each key's line."""

    def __init__(self, value: Any, line: int, key_lines: dict[str, int] | None = None):
        self.value, self.line, self.key_lines = value, line, key_lines or {}


def _convert(node: yaml.Node, where: str) -> _Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, _Node] = {}
        lines: dict[str, int] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise UsageError(f"{where}:{knode.start_mark.line + 1}: mapping keys must be plain names")
            key = knode.value
            if key in out:
                raise UsageError(f"{where}:{knode.start_mark.line + 1}: key '{key}' appears twice")
            out[key] = _convert(vnode, where)
            lines[key] = knode.start_mark.line + 1
        return _Node(out, line, lines)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_convert(v, where) for v in node.value], line)
    loader = _Loader("")
    try:
        return _Node(loader.construct_object(node, deep=True), line)
    finally:
        loader.dispose()


def _plain(node: _Node) -> Any:
    if isinstance(node.value, dict):
        return {k: _plain(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [_plain(v) for v in node.value]
    return node.value


def read_yaml(path: Path) -> _Node:
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{where}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: not UTF-8 text (byte {e.start}); a task file is a UTF-8 YAML mapping") from None
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{where}:{line}: invalid YAML: {problem}") from None
    if root is None:
        raise UsageError(f"{where}:1: empty file; expected a task mapping")
    return _convert(root, where)


# ---------------------------------------------------------------------------------------------
# Validation


def _expect(node: _Node, tp: Any, where: str, key: str) -> Any:
    return coerce_value(_plain(node), tp, f"{where}:{node.line}: {key}")


def _dataclass_from(cls: type, node: _Node | None, where: str, key: str) -> Any:
    """Instantiate the protocol's ``Data``/``Params`` dataclass from a YAML mapping, strictly."""
    if node is None:
        try:
            return cls()
        except TypeError:
            missing = [f.name for f in dataclasses.fields(cls)
                       if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            raise UsageError(f"{where}:1: '{key}' is missing; it needs {', '.join(missing)}") from None
    if not isinstance(node.value, dict):
        raise UsageError(f"{where}:{node.line}: '{key}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, child in node.value.items():
        if name not in fields:
            raise UsageError(f"{where}:{node.key_lines[name]}: unknown key '{key}.{name}'{closest(name, list(fields))}"
                             f"; allowed: {', '.join(fields) or '(none)'}")
        values[name] = _expect(child, hints[name], where, f"{key}.{name}")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError(f"{where}:{node.line}: '{key}' is missing {', '.join(missing)}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}:{node.line}: {key}: {e}") from None


def parse_task(path: Path, registry: Registry | None = None) -> Task:
    """Read and validate one task file."""
    registry = registry or get_registry()
    where = str(path)
    root = read_yaml(path)
    if not isinstance(root.value, dict):
        raise UsageError(f"{where}:{root.line}: expected a mapping of task fields")
    doc, lines = root.value, root.key_lines
    for key in doc:
        if key not in REQUIRED + OPTIONAL:
            raise UsageError(f"{where}:{lines[key]}: unknown key '{key}'{closest(key, list(REQUIRED + OPTIONAL))}")
    for key in REQUIRED:
        if key not in doc:
            raise UsageError(f"{where}:{root.line}: missing required key '{key}'")
    name = _expect(doc["task"], str, where, "task")
    protocol_name = _expect(doc["protocol"], str, where, "protocol")
    if protocol_name not in registry.protocols:
        known = sorted(registry.protocols)
        raise UsageError(f"{where}:{doc['protocol'].line}: unknown protocol '{protocol_name}'"
                         f"{closest(protocol_name, known)}; known: {', '.join(known) or '(none)'}")
    protocol = registry.protocols[protocol_name].obj
    task = Task(
        name=name,
        version=_expect(doc["version"], int, where, "version"),
        protocol=protocol_name,
        model=_expect(doc["model"], str | None, where, "model") or "",
        path=path,
        line=root.line,
        tags=_expect(doc["tags"], list[str], where, "tags") if "tags" in doc else [],
        description=_expect(doc["description"], str, where, "description").strip() if "description" in doc else "",
        data=_dataclass_from(protocol.Data, doc.get("data"), where, "data"),
        params=_dataclass_from(protocol.Params, doc.get("params"), where, "params"),
        seed=_expect(doc["seed"], int, where, "seed") if "seed" in doc else 0,
    )
    if "model_args" in doc:
        from memeval.loading import parse_model_args

        node = doc["model_args"]
        if not isinstance(node.value, dict):
            raise UsageError(f"{where}:{node.line}: 'model_args' must be a mapping, e.g. {{revision: main}}")
        task.model_args = parse_model_args(_plain(node), f"{where}:{node.line}: model_args")
    if "metrics" in doc:
        _parse_metrics(task, doc["metrics"], where)
    if "method_config" in doc:
        _parse_method_config(task, doc["method_config"], where, registry)
    return task


def _parse_metrics(task: Task, node: _Node, where: str) -> None:
    if not isinstance(node.value, dict):
        raise UsageError(f"{where}:{node.line}: 'metrics' must be a mapping")
    for key, child in node.value.items():
        if key == "primary":
            task.primary = _expect(child, str, where, "metrics.primary")
        elif key == "higher_is_better":
            task.higher_is_better = _expect(child, dict[str, bool], where, "metrics.higher_is_better")
        else:
            raise UsageError(f"{where}:{node.key_lines[key]}: unknown key 'metrics.{key}'; "
                             f"allowed: primary, higher_is_better")


def _parse_method_config(task: Task, node: _Node, where: str, registry: Registry) -> None:
    if not isinstance(node.value, dict):
        raise UsageError(f"{where}:{node.line}: 'method_config' must be a mapping of method -> overrides")
    for method_name, child in node.value.items():
        line = node.key_lines[method_name]
        if not isinstance(child.value, dict):
            raise UsageError(f"{where}:{child.line}: method_config.{method_name} must be a mapping")
        overrides = _plain(child)
        task.method_config[method_name] = overrides
        task.method_config_lines[method_name] = line
        if method_name in registry.methods:  # methods from plugins not installed are checked when used
            build_config(registry.methods[method_name].obj, overrides, f"{where}:{line}")


# ---------------------------------------------------------------------------------------------
# Discovery and selection


@dataclass
class TaskIndex:
    tasks: dict[str, Task]
    groups: dict[str, list[str]]

    def select(self, spec: str) -> list[Task]:
        """Tasks named by ``all``, a comma list of task names and groups (tags), in a stable order."""
        names: list[str] = []
        for part in [p.strip() for p in spec.split(",") if p.strip()]:
            if part == "all":
                names.extend(self.tasks)
            elif part in self.groups:
                names.extend(self.groups[part])
            elif part in self.tasks:
                names.append(part)
            else:
                raise UsageError(f"unknown task or group '{part}'{closest(part, list(self.tasks) + list(self.groups))}"
                                 f"; `memeval ls tasks` lists them")
        if not names:
            raise UsageError("--tasks: no task named")
        return [self.tasks[n] for n in dict.fromkeys(names)]


def task_files(dirs: Iterable[Path]) -> list[Path]:
    out = []
    for d in dirs:
        d = Path(d)
        if d.is_file():
            out.append(d)
        elif d.is_dir():
            out.extend(sorted(p for p in d.rglob("*.yaml") if p.is_file()))
        else:
            raise UsageError(f"--include-path {d}: no such directory")
    return out


def load_tasks(include_paths: Iterable[Path] = (), registry: Registry | None = None) -> TaskIndex:
    """Index built-in, plugin-shipped and ``--include-path`` tasks; a duplicate name is an error."""
    registry = registry or get_registry()
    dirs = [p.obj for p in registry.task_dirs] + [Path(p) for p in include_paths]
    tasks: dict[str, Task] = {}
    groups: dict[str, list[str]] = {}
    for path in task_files(dirs):
        task = parse_task(path, registry)
        if task.name in tasks:
            other = tasks[task.name]
            raise UsageError(f"{path}:{task.line}: duplicate task name '{task.name}' "
                             f"(already defined in {other.path}:{other.line})")
        tasks[task.name] = task
        for tag in task.tags:
            groups.setdefault(tag, []).append(task.name)
    return TaskIndex(tasks, groups)


# ---------------------------------------------------------------------------------------------
# Command-line overrides (--task-config, --model)


def parse_task_overrides(items: list[str], index: TaskIndex) -> dict[str, dict[str, str]]:
    """``TASK.data.KEY=VALUE`` / ``TASK.params.KEY=VALUE`` strings → {task: {"data.KEY": value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        target, eq, value = item.partition("=")
        name, _, key = target.partition(".")
        section, _, field_name = key.partition(".")
        if not eq or not name or section not in ("data", "params") or not field_name:
            raise UsageError(f"--task-config '{item}': expected TASK.data.KEY=VALUE or TASK.params.KEY=VALUE, "
                             f"e.g. del_file.data.path=memorized.jsonl")
        if name not in index.tasks:
            raise UsageError(f"--task-config '{item}': unknown task '{name}'{closest(name, list(index.tasks))}")
        out.setdefault(name, {})[key] = value
    return out


def override_task(task: Task, overrides: dict[str, Any], source: str = "--task-config") -> Task:
    """A copy of ``task`` with ``data``/``params`` fields replaced, each value typed and checked as the
    YAML's is (``{"data.path": "x.jsonl", "params.ratios": "0.1,0.2"}``); the config hash follows."""
    sections: dict[str, dict[str, Any]] = {"data": {}, "params": {}}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise UsageError(f"{source} {task.name}.{key}: expected data.KEY or params.KEY")
        obj = getattr(task, section)
        fields = [f.name for f in dataclasses.fields(obj)]
        if name not in fields:
            raise UsageError(f"{source} {task.name}.{key}: task '{task.name}' has no {section} key '{name}'"
                             f"{closest(name, fields)}; it has: {', '.join(fields)}")
        hint = typing.get_type_hints(type(obj))[name]
        sections[section][name] = coerce_value(value, hint, f"{source} {task.name}.{key}")
    changed = {}
    for section, values in sections.items():
        if values:
            try:
                changed[section] = dataclasses.replace(getattr(task, section), **values)
            except (ValueError, TypeError) as e:
                raise UsageError(f"{source} {task.name}.{section}: {e}") from None
    return dataclasses.replace(task, **changed)


def override_model(task: Task, spec: str, model_args: dict[str, Any], registry: Registry | None = None) -> Task:
    """A copy of ``task`` scoring the model ``spec`` (``--model``) with ``model_args``; a task whose data
    belong to its own model refuses in one line (:meth:`memeval.protocols.Protocol.model_override_refusal`)."""
    from memeval.loading import resolve_spec

    registry = registry or get_registry()
    if not spec.startswith(("memory:", "organism:")):
        resolve_spec(spec)  # a directory that is not there fails now, in one line, before any data is read
    why = registry.protocols[task.protocol].obj.model_override_refusal(task, spec)
    if why:
        raise UsageError(f"--model {spec}: task '{task.name}' cannot score another model: {why}")
    return dataclasses.replace(task, model=spec, model_args={**task.model_args, **model_args})
