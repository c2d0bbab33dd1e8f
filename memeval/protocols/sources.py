"""Where a protocol's sequences come from: the model organism named by the task, or files a user gives.

Paths in task YAMLs may use environment variables (``${MEMEVAL_DATA}/mempi/...``). A missing file is a
one-line :class:`UsageError` that says what is missing and where to get it.
"""

from __future__ import annotations

import json
import os
import random
import re
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
        raise UsageError(f"a data path is required for {what} (set it in the YAML or with --task-config "
                         f"TASK.data.KEY=FILE; `memeval memorized extract` writes memorized.jsonl); {where_to_get}")
    expanded = Path(os.path.expandvars(os.path.expanduser(path)))
    unset = [m.group(1) or m.group(2) for m in re.finditer(r"\$\{(\w+)\}|\$(\w+)", str(expanded))]
    if unset:
        raise UsageError(f"data path '{path}': environment variable {', '.join(unset)} is not set; {where_to_get}")
    if not expanded.exists():
        raise UsageError(f"data.path '{expanded}' not found ({what}); {where_to_get}")
    return expanded


def load_token_rows(path: Path, prefix_len: int, tokenizer: Any = None) -> list[TokenSequence]:
    """Sequences from a ``.pt`` LongTensor ``[N, T]`` (MemPi's Pythia sets) or a JSONL file with, per line,
    ``input_ids`` or ``text`` (tokenized with ``tokenizer``, the scored model's), and optionally ``id`` and
    ``prefix_len`` (what ``memeval memorized extract`` writes). Token ids win when a line has both: they are
    exactly what was measured."""
    if path.suffix == ".pt":
        tensor = torch.load(path, map_location="cpu")
        return [TokenSequence(f"{path.stem}:{i}", tuple(r.tolist()), prefix_len) for i, r in enumerate(tensor)]
    out = []
    for n, obj in jsonl_objects(path, "an object with input_ids or text"):
        if isinstance(obj.get("input_ids"), list) and all(isinstance(t, int) for t in obj["input_ids"]):
            ids = obj["input_ids"]
        elif isinstance(obj.get("text"), str):
            if tokenizer is None:
                raise UsageError(f"{path}:{n}: a text line needs the model's tokenizer here; give input_ids")
            ids = tokenizer(obj["text"])["input_ids"]
        else:
            raise UsageError(f"{path}:{n}: expected \"input_ids\" (a list of ints) or \"text\" (a string)")
        rows_prefix = obj.get("prefix_len", prefix_len)
        if not isinstance(rows_prefix, int) or rows_prefix < 0:
            raise UsageError(f"{path}:{n}: prefix_len must be a non-negative integer, got {rows_prefix!r}")
        if len(ids) <= rows_prefix:
            raise UsageError(f"{path}:{n}: {len(ids)} tokens, no more than the prefix ({rows_prefix}); each sequence "
                             f"needs a prefix and a suffix (set data.prefix_tokens or the line's prefix_len)")
        out.append(TokenSequence(str(obj.get("id", f"{path.stem}:{len(out)}")), tuple(ids), rows_prefix))
    return out


def beside(path: str | None, default: str | None, name: str) -> str | None:
    """``default`` if set, else ``name`` in the folder of ``path`` when that file exists (the layout written by
    ``memeval memorized extract``: memorized.jsonl with heldout.jsonl beside it)."""
    if default or not path:
        return default
    candidate = Path(os.path.expandvars(os.path.expanduser(path))).parent / name
    return str(candidate) if candidate.is_file() else None


def load_prompt_rows(path: Path, tokenizer: Any) -> list[TokenSequence]:
    """MemPi's hand-collected GPT2-XL set: JSONL ``{prompt, all}``; the prompt is the prefix."""
    out = []
    for i, (n, obj) in enumerate(jsonl_objects(path, 'an object with "prompt" and "all" strings')):
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("all"), str):
            raise UsageError(f'{path}:{n}: expected an object with "prompt" and "all" strings (MemPi\'s GPT2-XL format)')
        prefix = tokenizer(obj["prompt"])["input_ids"]
        ids = tokenizer(obj["all"])["input_ids"]
        out.append(TokenSequence(f"{path.stem}:{i}", tuple(ids), len(prefix)))
    return out


def load_texts(path: Path, key: str) -> list[str]:
    """One text per JSONL line under ``key`` (e.g. ECBD's ``definition``, or ``text``)."""
    out = []
    for n, obj in jsonl_objects(path, f"an object with a \"{key}\" string"):
        if not isinstance(obj.get(key), str):
            raise UsageError(f"{path}:{n}: expected an object with a \"{key}\" string (data.key: {key})")
        out.append(obj[key])
    return out


def jsonl_objects(path: Path, expected: str):
    """(line number, object) of every non-empty line of a JSONL file; one-line errors naming file and line
    for text that is not UTF-8, a line that is not JSON, or a value that is not an object."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; expected JSONL with {expected} per line") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not JSON ({e.msg}); expected {expected}") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{path}:{n}: expected {expected}")
        yield n, obj


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
