"""The :class:`Organism` handle on a cached build, and getting (building it if needed) or removing one; the build
and its cache key are :mod:`memeval.organisms.build`."""

from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from memeval.errors import UsageError
from memeval.organisms import cache
from memeval.organisms.build import build_organism, dump_jsonl, organism_key
from memeval.organisms.presets import PRESETS, check

#: organism files that are measurements, not part of a Hugging Face model directory
_NOT_EXPORTED = {"organism.json", "planted.jsonl", "controls.jsonl", "memorized.jsonl", "probes.json", "memorization.png"}


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class Organism:
    """A built organism in the cache (read-only view over its files).

    - ``path``: the final model directory (``from_pretrained`` loads model and tokenizer from it);
      ``checkpoints``: model directories at ``checkpoint_fractions`` of training, the last being ``path``;
    - ``planted``: every planted sequence with ``id, kind, duplicates`` (copies in the corpus),
      ``exposures`` (how many sampled training chunks started a copy: about duplicates × epochs),
      ``text, input_ids`` (prefix_len + suffix_len tokens) and its measured ``suffix_acc, exact,
      distance, distinct_true, distinct_greedy, suffix_nll, passes`` (DEL filters 1-3), ``memorized``;
    - ``memorized``: the planted sequences passing all DEL filters (incl. the 5-gram dedup), with
      ``id, kind, duplicates, input_ids, prefix_len, suffix_acc, distance, text, exact``;
    - ``controls``: planted-like sequences never trained on (duplicates 0), measured the same way;
    - ``heldout`` (texts never trained on, same distributions), ``new_entities`` (never-seen entity
      definitions), ``facts`` and ``arithmetic`` ((prompt, answer) probes, answers start with a space);
    - ``info``: every measurement (see ``memeval organism info --json``); ``manifest``: where each
      planted sequence sits in the training stream; ``train_documents()``: the stream itself.
    """

    def __init__(self, path: Path, preset: str, arch: str, seed: int) -> None:
        self.path = Path(path)
        self.preset, self.arch, self.seed = preset, arch, seed

    def __repr__(self) -> str:
        return f"Organism({self.preset}:{self.arch}@{self.seed}, {self.path})"

    @cached_property
    def info(self) -> dict[str, Any]:
        return json.loads((self.path / "organism.json").read_text())

    @property
    def prefix_len(self) -> int:
        return int(self.info["prefix_len"])

    @property
    def suffix_len(self) -> int:
        return int(self.info["suffix_len"])

    @property
    def checkpoints(self) -> list[Path]:
        """Model directories at increasing fractions of training; the last is the final model."""
        return [(self.path / c["path"]).resolve() for c in self.info["checkpoints"]]

    @property
    def checkpoint_fractions(self) -> list[float]:
        return [float(c["fraction"]) for c in self.info["checkpoints"]]

    @cached_property
    def planted(self) -> list[dict[str, Any]]:
        return _load_jsonl(self.path / "planted.jsonl")

    @cached_property
    def controls(self) -> list[dict[str, Any]]:
        """Planted-like sequences that were never trained on (duplicates 0), measured like the others."""
        return _load_jsonl(self.path / "controls.jsonl")

    @cached_property
    def memorized(self) -> list[dict[str, Any]]:
        return _load_jsonl(self.path / "memorized.jsonl")

    @cached_property
    def _probes(self) -> dict[str, Any]:
        return json.loads((self.path / "probes.json").read_text())

    @property
    def heldout(self) -> list[str]:
        return list(self._probes["heldout"])

    @property
    def heldout_documents(self) -> list[dict[str, str]]:
        """The never-trained-on documents with their kind, ``{"kind", "text"}``, in the order of :attr:`heldout`."""
        return [{"kind": k, "text": t} for k, t in zip(self._probes["heldout_kinds"], self._probes["heldout"])]

    @property
    def new_entities(self) -> list[str]:
        return list(self._probes["new_entities"])

    @property
    def facts(self) -> list[tuple[str, str]]:
        return [tuple(f) for f in self._probes["facts"]]

    @property
    def arithmetic(self) -> list[tuple[str, str]]:
        return [tuple(f) for f in self._probes["arithmetic"]]

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / "corpus" / "manifest.json").read_text())

    def train_documents(self) -> list[dict[str, Any]]:
        """Every training document in stream order: ``{"doc", "kind", "planted_id", "text"}``."""
        return _load_jsonl(self.path / "corpus" / "train.jsonl")

    def export(self, out: Path) -> Path:
        """Write the final model as a plain Hugging Face directory (weights, config, tokenizer) into ``out``
        with ``train.jsonl`` (``{"text"}`` per training document, in stream order: what the model was
        trained on) and ``organism_memorized.jsonl`` (the organism's memorized set: ``id, text, input_ids,
        prefix_len``), so the organism can be used as a user's own model would be."""
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out}: exists and is not an empty directory")
        out.mkdir(parents=True, exist_ok=True)
        for f in self.path.iterdir():
            if f.is_file() and f.name not in _NOT_EXPORTED:
                shutil.copy2(f, out / f.name)
        dump_jsonl(out / "train.jsonl", [{"text": d["text"]} for d in self.train_documents()])
        dump_jsonl(out / "organism_memorized.jsonl",
                    [{"id": m["id"], "text": m["text"], "input_ids": m["input_ids"], "prefix_len": m["prefix_len"]}
                     for m in self.memorized])
        return out

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """The final model as a :class:`memeval.models.NeuronModel`."""
        from memeval.loading import load_model

        return load_model(str(self.path), device=device, dtype=dtype)


def get_organism(preset: str = "tiny", arch: str = "gpt_neox", seed: int = 0, progress: bool = True) -> Organism:
    """The organism ``preset:arch@seed``, built (with progress on stderr) unless it is already cached."""
    p = check(preset, arch)
    key = organism_key(p, arch, seed)
    path = cache.build_atomically(key, lambda tmp: build_organism(p, arch, seed, tmp, progress, key))
    return Organism(path, preset, arch, seed)


def remove_organism(preset: str, arch: str, seed: int) -> bool:
    """Delete a cached organism; True when there was one."""
    path = cache.entry_dir(organism_key(check(preset, arch), arch, seed))
    if path.exists():
        shutil.rmtree(path)
        return True
    return False


__all__ = ["Organism", "get_organism", "build_organism", "organism_key", "PRESETS"]
