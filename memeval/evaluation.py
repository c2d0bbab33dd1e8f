"""The Python entry point: ``memeval.evaluate(...)``, the same run as the ``memeval`` command.

    import memeval
    summary = memeval.evaluate("zero_out,random", "del_file", model="path/to/model",
                               task_config={"del_file.data.path": "memorized/memorized.jsonl",
                                            "del_file.data.ppl_path": "memorized/heldout.jsonl"})
    summary["results"][0]["primary"]      # {"name": ..., "value": ..., "stderr": ..., "higher_is_better": ...}

The CLI is a thin layer over the same :func:`memeval.runner.execute`, so both give the same numbers for the
same arguments. ``model`` may also be a model object (with its tokenizer), e.g. inside a training loop.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from memeval.errors import UsageError


def _names(value: str | Iterable[str], what: str) -> str:
    if isinstance(value, str):
        return value
    names = [str(v) for v in value]
    if not names:
        raise UsageError(f"{what}: no name given")
    return ",".join(names)


def _overrides(value: Mapping[str, Any] | Iterable[str] | None, what: str) -> list[str]:
    """``{"slimming": {"lr": 1e-3}}``, ``{"slimming.lr": 1e-3}`` or ``["slimming.lr=1e-3"]`` → CLI strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Mapping):
        return [str(v) for v in value]
    out = []
    for key, val in value.items():
        if isinstance(val, Mapping):
            out += [f"{key}.{k}={_text(v)}" for k, v in val.items()]
        else:
            out.append(f"{key}={_text(val)}")
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return str(value)


def _model_spec(model: Any) -> str | None:
    """A spec string as given, or an in-memory model registered under ``memory:<fingerprint>``."""
    from memeval.loading import register_in_memory
    from memeval.models import NeuronModel

    if model is None or isinstance(model, (str, Path)):
        return None if model is None else str(model)
    if isinstance(model, NeuronModel):
        return register_in_memory(model.hf, model.tokenizer)
    if isinstance(model, tuple) and len(model) == 2:
        return register_in_memory(*model)
    raise UsageError("model: expected a spec (hf:<repo>, a directory, organism:<preset>), a (transformers model, "
                     f"tokenizer) pair or a memeval NeuronModel; got {type(model).__name__}")


def evaluate(methods: str | Iterable[str], tasks: str | Iterable[str], model: Any = None,
             output: str | Path | None = None, limit: int | None = None, device: str = "auto", dtype: str = "auto",
             method_config: Mapping[str, Any] | Iterable[str] | None = None,
             task_config: Mapping[str, Any] | Iterable[str] | None = None, progress: bool = True,
             *, model_args: Mapping[str, Any] | str | None = None, seed: int = 0, batch_size: int = 8,
             include_paths: Iterable[str | Path] = (), split: str = "test", log_samples: bool = False,
             workers: int | None = None, backend: str = "local", ray_address: str | None = None) -> dict[str, Any]:
    """Score ``methods`` on ``tasks`` and return the summary (the schema of ``summary.json``).

    - ``methods``, ``tasks``: as ``--methods`` / ``--tasks`` (``"all"``, kinds, groups, names; a list works too);
    - ``model``: overrides the tasks' model: a spec (``hf:repo[@rev]``, a directory, ``organism:<preset>``) or a
      ``(transformers model, tokenizer)`` pair / :class:`~memeval.models.NeuronModel`, which is copied, never
      modified, and named by its weight fingerprint in the config hash (so results of other weights never mix);
    - ``output``: the results directory (resumable, like ``--output``); ``None``: a temporary one, removed after;
    - ``method_config``, ``task_config``: ``{"slimming": {"lr": 1e-3}}`` or ``{"del_file.data.path": "x.jsonl"}``
      or the CLI's ``KEY=VALUE`` strings; checked and typed as in the YAML.

    Bad input raises :class:`memeval.errors.UsageError` with the CLI's one-line message. ``device="cuda:0,cuda:1"``
    scores in worker processes as the CLI does, and ``workers``/``backend`` are as ``--workers``/``--backend``
    (a model given as an object stays in this process: it cannot be sent to workers).
    """
    from memeval.runner import RunOptions, execute

    def options(out: Path) -> RunOptions:
        return RunOptions(methods=_names(methods, "methods"), tasks=_names(tasks, "tasks"), output=out, limit=limit,
                          device=device, dtype=dtype, seed=seed, batch_size=batch_size,
                          include_paths=[Path(p) for p in include_paths],
                          method_config=_overrides(method_config, "method_config"), split=split,
                          model=_model_spec(model), model_args=model_args,
                          task_config=_overrides(task_config, "task_config"), log_samples=log_samples,
                          progress=progress, workers=workers, backend=backend, ray_address=ray_address)

    if output is not None:
        return execute(options(Path(output)))
    with tempfile.TemporaryDirectory(prefix="memeval-") as tmp:
        return execute(options(Path(tmp)))
