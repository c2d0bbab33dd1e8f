"""Model specs and loading (DESIGN §5): which model a spec names, on which device and in which dtype.

Model specs:
- ``organism:<preset>[:<arch>][@<seed>]``: a model organism trained by memeval (``memeval.organisms``);
- ``hf:<repo>[@<revision>]``: a Hugging Face hub model (or its copy in the local HF cache);
- a local directory holding a transformers model and tokenizer;
- ``memory:<fingerprint>``: a model object registered in this process (:func:`register_in_memory`).

:func:`load_model` returns the model as a :class:`memeval.models.NeuronModel`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from memeval.api import coerce_value
from memeval.errors import UsageError, closest
from memeval.models import NeuronModel

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# prefix -> function(rest_of_spec) -> local directory of a transformers model
_SOURCES: dict[str, Callable[[str], Path]] = {}


def register_model_source(prefix: str, resolve: Callable[[str], Path]) -> None:
    """Let ``<prefix>:<rest>`` model specs resolve to a local model directory (e.g. ``organism:``)."""
    _SOURCES[prefix] = resolve


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; a named device that is absent is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device '{name}' (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype '{name}' (expected auto, {', '.join(DTYPES)})")
    return DTYPES[name]


# Keyword arguments of ``--model-args`` and their types; ``dtype`` is the run's ``--dtype``.
MODEL_ARGS: dict[str, type] = {"revision": str, "trust_remote_code": bool, "attn_implementation": str,
                               "subfolder": str, "dtype": str}

# In-memory models handed to :func:`memeval.evaluate`: ``memory:<fingerprint>`` -> (model, tokenizer).
_IN_MEMORY: dict[str, tuple[nn.Module, object]] = {}


def parse_model_args(text: str | dict | None, where: str = "--model-args") -> dict[str, object]:
    """``revision=main,trust_remote_code=true`` (or a dict) → typed keyword arguments for loading."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, dict) else [p.partition("=")[::2] for p in text.split(",") if p.strip()]
    out: dict[str, object] = {}
    for key, value in pairs:
        key = str(key).strip()
        if key not in MODEL_ARGS:
            raise UsageError(f"{where}: unknown key '{key}'{closest(key, list(MODEL_ARGS))}; "
                             f"known: {', '.join(MODEL_ARGS)}")
        if value == "" or value is None:
            raise UsageError(f"{where}: '{key}' has no value; expected {key}=VALUE")
        out[key] = coerce_value(value.strip() if isinstance(value, str) else value, MODEL_ARGS[key], f"{where}: {key}")
    if "dtype" in out:
        resolve_dtype(str(out["dtype"]), torch.device("cpu"))  # a clear error for an unknown dtype
    return out


def register_in_memory(hf_model: nn.Module, tokenizer) -> str:
    """Register a model object (a notebook's, a training loop's) and return its spec ``memory:<fingerprint>``.

    A deep copy is kept, so the caller's model is never moved, cast or modified, and every load (the
    runner reloads to restore weights a method changed) starts from the weights as they were when
    registered. The fingerprint of the weights names it, so results of different weights never mix."""
    if not isinstance(hf_model, nn.Module) or tokenizer is None:
        raise UsageError("model: expected a spec string, or a (transformers model, tokenizer) pair")
    copy_ = copy.deepcopy(hf_model).cpu()
    spec = f"memory:{NeuronModel(copy_, tokenizer).fingerprint()}"
    _IN_MEMORY[spec] = (copy_, tokenizer)
    return spec


def resolve_spec(spec: str) -> tuple[str, str | None]:
    """Map a model spec to (path or repo id, revision) for ``from_pretrained``."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _SOURCES:
        return str(_SOURCES[prefix](rest)), None
    if sep and prefix == "hf":
        repo, _, revision = rest.partition("@")
        if not repo:
            raise UsageError(f"model '{spec}': expected hf:<repo>[@<revision>]")
        return repo, revision or None
    if sep and prefix == "organism":
        raise UsageError(f"model '{spec}': model organisms are not available (memeval.organisms failed to load)")
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path), None
    raise UsageError(
        f"model '{spec}': not a directory, and not organism:<preset> or hf:<repo>[@<revision>]"
    )


def load_model(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               model_args: dict[str, object] | None = None) -> NeuronModel:
    """Load a causal LM and its tokenizer from a model spec and wrap it as a :class:`NeuronModel`.

    ``model_args`` (:func:`parse_model_args`) are passed to ``from_pretrained``: ``revision`` (overrides a
    spec's ``@rev``), ``trust_remote_code``, ``attn_implementation``, ``subfolder``; their ``dtype`` is
    resolved by the caller into ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import memeval.organisms  # noqa: F401  (registers the organism: source)

    if spec in _IN_MEMORY:
        hf, tokenizer = _IN_MEMORY[spec]
        return NeuronModel(copy.deepcopy(hf).to(device=device, dtype=dtype), tokenizer, spec)
    if spec.startswith("memory:"):
        raise UsageError(f"model '{spec}': an in-memory model lives only in the process that registered it")
    kwargs = {k: v for k, v in (model_args or {}).items() if k != "dtype"}
    target, revision = resolve_spec(spec)
    revision = kwargs.pop("revision", revision)
    tok_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "subfolder") if k in kwargs}
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, revision=revision, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(target, revision=revision, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"model '{spec}': cannot load it ({first[:160]}). Download it where the hub is reachable "
            f"(`huggingface-cli download {target}`) and point HF_HOME at that cache, or pass a local directory"
        ) from None
    return NeuronModel(model.to(device), tokenizer, spec)
