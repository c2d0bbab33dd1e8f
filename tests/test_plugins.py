"""Plugin discovery: the testing fixture, duplicates, broken plugins, MEMEVAL_LOAD_PLUGINS, installed packages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memeval import hookimpl, plugins
from memeval.api import Localizer
from memeval.errors import UsageError


def make_plugin(method_name: str):
    class Plug:
        @hookimpl
        def memeval_methods(self):
            class M(Localizer):
                name = method_name
                summary = "test method"

            return [M]

    return Plug()


def test_fixture_registers_for_one_test_only(memeval_plugin):
    memeval_plugin(make_plugin("only_here"), "p1")
    assert "only_here" in plugins.get_registry().methods
    assert plugins.get_registry().methods["only_here"].plugin == "p1"


def test_fixture_cleaned_up_after_previous_test():
    assert "only_here" not in plugins.get_registry().methods


def test_two_methods_with_one_name_name_both_distributions(memeval_plugin):
    memeval_plugin(make_plugin("random"), "clash")
    with pytest.raises(UsageError) as err:
        plugins.get_registry()
    text = str(err.value)
    assert "method 'random' is provided twice" in text and "distribution memeval" in text and "<test>" in text


def test_invalid_method_class_is_skipped_with_a_warning(memeval_plugin):
    class Bad:
        @hookimpl
        def memeval_methods(self):
            class NoKind(Localizer):
                name = "nokind"
                kind = "oracle"

            return [NoKind]

    memeval_plugin(Bad(), "bad")
    with pytest.warns(UserWarning, match="kind is 'oracle'"):
        reg = plugins.get_registry()
    assert "nokind" not in reg.methods and "random" in reg.methods


PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"
[project]
name = "memeval-{name}"
version = "0.0.1"
[project.entry-points.memeval]
{name} = "memeval_{name}"
"""

PLUGIN = """
from dataclasses import dataclass
import torch
from memeval import hookimpl
from memeval.api import Localizer

class Constant(Localizer):
    name = "{name}"
    summary = "constant scores (an installed test plugin)"
    @dataclass
    class Config(Localizer.Config):
        value: float = 1.0
    def localize(self, model, batch):
        return torch.full((len(batch), model.num_layers, model.num_neurons), self.config.value, device=model.device)

@hookimpl
def memeval_methods():
    return [Constant]
"""


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   capture_output=True)


def _memeval(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "memeval.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_installed_plugin_package_is_discovered_and_removable(tmp_path):
    """Build a separate plugin distribution, pip-install it, use it, filter it, break it, uninstall it."""
    pkg = tmp_path / "memeval-constplug"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT.format(name="constplug"))
    module = pkg / "memeval_constplug.py"
    module.write_text(PLUGIN.format(name="constplug"))
    _pip("install", "--no-build-isolation", "--no-deps", "-e", str(pkg))
    try:
        listed = json.loads(_memeval("ls", "methods", "--json").stdout)
        row = next(r for r in listed if r["name"] == "constplug")
        assert row["plugin"] == "memeval-constplug" and row["kind"] == "localizer"
        # MEMEVAL_LOAD_PLUGINS limits third-party plugins; memeval's own always load.
        names = {r["name"] for r in json.loads(_memeval("ls", "methods", "--json", env={"MEMEVAL_LOAD_PLUGINS": ""}).stdout)}
        assert "constplug" not in names and "random" in names
        names = {r["name"] for r in json.loads(_memeval("ls", "methods", "--json",
                                                        env={"MEMEVAL_LOAD_PLUGINS": "constplug"}).stdout)}
        assert "constplug" in names
        # A plugin that fails to import: a one-line warning naming it, the rest still load.
        module.write_text("raise ImportError('missing dependency xyz')\n")
        proc = _memeval("ls", "methods", "--json")
        assert proc.returncode == 0
        assert "plugin 'constplug' (distribution memeval-constplug) failed to import" in proc.stderr
        assert "missing dependency xyz" in proc.stderr
        assert "random" in {r["name"] for r in json.loads(proc.stdout)}
    finally:
        _pip("uninstall", "-y", "memeval-constplug")
    names = {r["name"] for r in json.loads(_memeval("ls", "methods", "--json").stdout)}
    assert "constplug" not in names


def test_entry_point_named_like_a_builtin_is_an_error_naming_both(monkeypatch, capsys):
    """A third-party entry point called `random` used to be skipped silently (the built-in won, or the
    reverse, by load order); now the CLI stops with one line naming both distributions."""
    from types import SimpleNamespace

    from memeval.cli import main

    real = plugins.entry_points(group=plugins.GROUP)
    shadow = SimpleNamespace(name="random", dist=SimpleNamespace(name="memeval-shadow"),
                             load=lambda: make_plugin("shadow_random"))
    monkeypatch.setattr(plugins, "entry_points", lambda group: [*real, shadow])
    monkeypatch.setattr(plugins, "_pm", None)
    monkeypatch.setattr(plugins, "_registry", None)
    monkeypatch.setattr(plugins, "_dists", {})
    assert main(["ls", "methods"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'random'" in err and "memeval-shadow" in err and "memeval and" in err


def test_plugins_command_lists_each_plugin_with_its_distribution_and_methods(memeval_plugin, capsys):
    from memeval.cli import main

    memeval_plugin(make_plugin("listed_here"), "listing-test-plugin")
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["listing-test-plugin"]["methods"] == ["listed_here"]
    assert {"deletion", "detection", "injection", "specificity"} <= set(rows["memeval.protocols.builtin"]["protocols"])
    assert rows["zero_out"]["distribution"] == "memeval" and rows["zero_out"]["version"]
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert "listing-test-plugin" in table and "listed_here" in table


def test_trace_plugins_prints_each_hook_call():
    out = subprocess.run([sys.executable, "-m", "memeval.cli", "ls", "methods", "--json"], capture_output=True,
                         text=True, env={**__import__("os").environ, "MEMEVAL_TRACE_PLUGINS": "1"})
    assert out.returncode == 0
    assert "memeval: hook memeval_methods: plugin 'zero_out' (memeval) gave 1: zero_out" in out.stderr
    assert "memeval: hook memeval_protocols: plugin 'memeval.protocols.builtin'" in out.stderr
    json.loads(out.stdout)  # the trace never mixes into the listing
