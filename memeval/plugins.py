"""Plugin discovery with pluggy (DESIGN §3).

Every method, built-in or third-party, arrives through the entry-point group ``memeval``: a module that
implements some of the hooks below. Built-in protocols are registered from ``DEFAULT_PLUGINS``.

- ``MEMEVAL_LOAD_PLUGINS=a,b`` loads only the third-party plugins named (entry-point or distribution
  name); an empty value loads none. memeval's own entry points always load.
- A plugin that fails to import is skipped with a warning naming it; the rest still load.
- Two methods (or protocols) with one name: a :class:`UsageError` naming both distributions.
- ``MEMEVAL_PLUGIN_MODULES=pkg.mod,other`` also registers importable modules that are not installed as
  distributions (a plugin under development; worker processes inherit it).
- ``MEMEVAL_TRACE_PLUGINS=1`` prints every hook call on stderr.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from memeval import hookspec
from memeval.api import KINDS, Method
from memeval.errors import UsageError, closest

GROUP = "memeval"
CORE_DIST = "memeval"
DEFAULT_PLUGINS = ("memeval.protocols.builtin",)


class HookSpecs:
    @hookspec
    def memeval_methods(self) -> list[type[Method]]:
        """Method classes (subclasses of Localizer, Editor, Predictor or Detector)."""

    @hookspec
    def memeval_task_dirs(self) -> list[str | Path]:
        """Directories of task YAMLs shipped by the plugin."""

    @hookspec
    def memeval_protocols(self) -> list[type]:
        """New task kinds: subclasses of ``memeval.protocols.Protocol``."""


@dataclass
class Provided:
    """Something a plugin provided, with its origin for listings and error messages."""

    obj: Any
    plugin: str
    dist: str


@dataclass
class Registry:
    methods: dict[str, Provided] = field(default_factory=dict)
    protocols: dict[str, Provided] = field(default_factory=dict)
    task_dirs: list[Provided] = field(default_factory=list)

    def method(self, name: str) -> type[Method]:
        if name not in self.methods:
            raise UsageError(f"unknown method '{name}'{closest(name, list(self.methods))}")
        return self.methods[name].obj


_pm: pluggy.PluginManager | None = None
_dists: dict[str, str] = {}  # plugin name -> distribution name
_registry: Registry | None = None


def _allowed(ep_name: str, dist: str) -> bool:
    if dist == CORE_DIST:
        return True
    allow = os.environ.get("MEMEVAL_LOAD_PLUGINS")
    if allow is None:
        return True
    names = {n.strip() for n in allow.split(",") if n.strip()}
    return ep_name in names or dist in names


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _pm
    if _pm is not None:
        return _pm
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(HookSpecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        _dists[module_name] = CORE_DIST
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        if not _allowed(ep.name, dist):
            continue
        if pm.has_plugin(ep.name):
            if _dists.get(ep.name) == dist:  # the same distribution seen twice (e.g. two metadata dirs)
                continue
            raise UsageError(f"plugin name '{ep.name}' is claimed by two distributions: {_dists.get(ep.name)} and "
                             f"{dist}; uninstall one or limit MEMEVAL_LOAD_PLUGINS")
        try:
            plugin = ep.load()
        except Exception as e:  # a broken plugin must not break memeval
            warnings.warn(f"memeval: plugin '{ep.name}' (distribution {dist}) failed to import and was skipped: "
                          f"{type(e).__name__}: {e}", stacklevel=2)
            continue
        pm.register(plugin, name=ep.name)
        _dists[ep.name] = dist
    for module_name in filter(None, (m.strip() for m in os.environ.get("MEMEVAL_PLUGIN_MODULES", "").split(","))):
        try:
            pm.register(importlib.import_module(module_name), name=module_name)
            _dists[module_name] = f"module {module_name}"
        except Exception as e:
            warnings.warn(f"memeval: plugin module '{module_name}' (MEMEVAL_PLUGIN_MODULES) failed to import and was "
                          f"skipped: {type(e).__name__}: {e}", stacklevel=2)
    _pm = pm
    return pm


def register(plugin: object, name: str, dist: str = "<test>") -> None:
    """Register a plugin object at run time (tests, notebooks); see ``memeval.testing``."""
    get_plugin_manager().register(plugin, name=name)
    _dists[name] = dist
    reset_registry()


def unregister(name: str) -> None:
    pm = get_plugin_manager()
    if pm.has_plugin(name):
        pm.unregister(name=name)
    _dists.pop(name, None)
    reset_registry()


def reset_registry() -> None:
    global _registry
    _registry = None


def _validate_method(cls: Any, origin: str) -> str | None:
    """Why ``cls`` is not a usable method class, or None."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        return f"{cls!r} is not a subclass of memeval.api.Method"
    if not cls.name:
        return f"{cls.__name__} has no name"
    if cls.kind not in KINDS:
        return f"{cls.__name__}.kind is {cls.kind!r}, expected one of {', '.join(KINDS)}"
    if not dataclasses.is_dataclass(cls.Config):
        return f"{cls.__name__}.Config is not a dataclass"
    return None


def _collect(hook_name: str) -> list[tuple[Any, str, str]]:
    """Call each implementation of a hook separately, so each result keeps its plugin and distribution."""
    pm = get_plugin_manager()
    out = []
    trace = bool(os.environ.get("MEMEVAL_TRACE_PLUGINS"))
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        dist = _dists.get(impl.plugin_name, "?")
        objs = list(impl.function() or [])
        if trace:
            names = ", ".join(getattr(o, "name", None) or str(o) for o in objs)
            print(f"memeval: hook {hook_name}: plugin '{impl.plugin_name}' ({dist}) gave {len(objs)}: {names}",
                  file=sys.stderr)
        out.extend((obj, impl.plugin_name, dist) for obj in objs)
    return out


def _add_unique(table: dict[str, Provided], what: str, name: str, item: Provided) -> None:
    if name in table:
        first = table[name]
        raise UsageError(
            f"{what} '{name}' is provided twice: by plugin '{first.plugin}' (distribution {first.dist}) and by "
            f"plugin '{item.plugin}' (distribution {item.dist}); uninstall one or limit MEMEVAL_LOAD_PLUGINS"
        )
    table[name] = item


def get_registry() -> Registry:
    """Methods, protocols and task directories from every loaded plugin (cached)."""
    global _registry
    if _registry is not None:
        return _registry
    reg = Registry()
    for cls, plugin, dist in _collect("memeval_methods"):
        problem = _validate_method(cls, plugin)
        if problem:
            warnings.warn(f"memeval: plugin '{plugin}' ({dist}): {problem}; method skipped", stacklevel=2)
            continue
        _add_unique(reg.methods, "method", cls.name, Provided(cls, plugin, dist))
    for cls, plugin, dist in _collect("memeval_protocols"):
        _add_unique(reg.protocols, "protocol", cls.name, Provided(cls, plugin, dist))
    for path, plugin, dist in _collect("memeval_task_dirs"):
        reg.task_dirs.append(Provided(Path(path), plugin, dist))
    _registry = reg
    return reg


def method_version(name: str, registry: Registry | None = None) -> str:
    """What identifies the code of method ``name``: its distribution's version (memeval's for built-ins)
    plus a digest of the source file that defines its class, so a new release of a plugin, or an edit to a
    method under development, never reuses results scored by the old code (``<version>+<digest>``)."""
    import hashlib
    import inspect
    from importlib.metadata import PackageNotFoundError, version

    registry = registry or get_registry()
    provided = registry.methods[name]
    cls = provided.obj
    try:
        dist_version = version(provided.dist)
    except (PackageNotFoundError, ValueError):
        dist_version = str(getattr(cls, "version", "") or "unversioned")
    try:
        source = inspect.getsource(inspect.getmodule(cls) or cls)
    except (OSError, TypeError):
        source = ""
    return f"{dist_version}+{hashlib.sha256(source.encode()).hexdigest()[:8]}"

