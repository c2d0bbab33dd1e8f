"""Shared fixtures: tiny random models built once per session, an isolated memeval cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memeval.testing import build_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> "callable":
    """``tiny_model_dir(arch)`` → a saved tiny random model of that architecture (built once per session)."""
    root = tmp_path_factory.mktemp("tiny-models")

    def get(arch: str = "gpt2") -> Path:
        return build_tiny_model(arch, root / arch)

    return get


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    if "MEMEVAL_CACHE" not in os.environ:
        monkeypatch.setenv("MEMEVAL_CACHE", str(tmp_path_factory.getbasetemp() / "memeval-cache"))


@pytest.fixture(scope="session")
def micro_organism(tmp_path_factory):
    """The micro gpt_neox organism, built once per session into the session's memeval cache."""
    from memeval.organisms import get_organism

    cache = os.environ.get("MEMEVAL_CACHE") or str(tmp_path_factory.getbasetemp() / "memeval-cache")
    old = os.environ.get("MEMEVAL_CACHE")
    os.environ["MEMEVAL_CACHE"] = cache
    try:
        return get_organism("micro", "gpt_neox", 0, progress=False)
    finally:
        if old is None:
            os.environ.pop("MEMEVAL_CACHE", None)
        else:
            os.environ["MEMEVAL_CACHE"] = old
