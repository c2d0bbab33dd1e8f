"""Where a protocol's sequences come from: the model organism named by the task, or files a user gives.

Paths in task YAMLs may use environment variables (``${MEMEVAL_DATA}/mempi/...``). A missing file is a
one-line :class:`UsageError` that says what is missing and where to get it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from memeval.api import TokenSequence
from memeval.errors import UsageError


def organism_for(model_spec: str):
    """The :class:`~memeval.organisms.Organism` behind an ``organism:`` model spec."""
    from memeval.organisms import get_organism, parse_organism_spec

    prefix, _, rest = model_spec.partition(":")
    if prefix != "organism":
        raise UsageError(f"data.source 'organism' needs an organism:<preset> model, not '{model_spec}'")
    return get_organism(*parse_organism_spec(rest))


def resolve_path(path: str | None, what: str, where_to_get: str) -> Path:
    if not path:
        raise UsageError(f"data.path is required for {what}; {where_to_get}")
    expanded = Path(os.path.expandvars(os.path.expanduser(path)))
    if "$" in str(expanded):
        raise UsageError(f"data.path '{path}': environment variable not set; {where_to_get}")
    if not expanded.exists():
        raise UsageError(f"data.path '{expanded}' not found ({what}); {where_to_get}")
    return expanded


def load_token_rows(path: Path, prefix_len: int) -> list[TokenSequence]:
    """Sequences from a ``.pt`` LongTensor ``[N, T]`` (MemPi's Pythia sets) or a JSONL file with
    ``input_ids`` (and optional ``prefix_len``) per line."""
    rows: list[tuple[list[int], int]] = []
    if path.suffix == ".pt":
        tensor = torch.load(path, map_location="cpu")
        rows = [(r.tolist(), prefix_len) for r in tensor]
    else:
        for line in path.read_text().splitlines():
            if line.strip():
                obj = json.loads(line)
                rows.append((obj["input_ids"], int(obj.get("prefix_len", prefix_len))))
    return [TokenSequence(f"{path.stem}:{i}", tuple(ids), p) for i, (ids, p) in enumerate(rows)]


def load_prompt_rows(path: Path, tokenizer: Any) -> list[TokenSequence]:
    """MemPi's hand-collected GPT2-XL set: JSONL ``{prompt, all}``; the prompt is the prefix."""
    out = []
    for i, line in enumerate(l for l in path.read_text().splitlines() if l.strip()):
        obj = json.loads(line)
        prefix = tokenizer(obj["prompt"])["input_ids"]
        ids = tokenizer(obj["all"])["input_ids"]
        out.append(TokenSequence(f"{path.stem}:{i}", tuple(ids), len(prefix)))
    return out


def load_texts(path: Path, key: str) -> list[str]:
    """One text per JSONL line under ``key`` (e.g. ECBD's ``definition``)."""
    return [json.loads(l)[key] for l in path.read_text().splitlines() if l.strip()]


def split_dev(items: list[Any], dev: int, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded shuffle, then the first ``dev`` items for tuning and the rest for testing (MemPi: 5 dev)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order[:dev], order[dev:]


def texts_to_sequences(texts: list[str], tokenizer: Any, max_tokens: int, prefix_len: int, tag: str) -> list[TokenSequence]:
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"][:max_tokens]
        if len(ids) > prefix_len + 1:
            out.append(TokenSequence(f"{tag}{i}", tuple(ids), prefix_len))
    return out
