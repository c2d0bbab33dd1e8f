"""The protocol interface: a task kind that prepares data and hidden ground truth, runs a method on a
batch of items and scores it (DESIGN §2, §6).

A protocol owns its ground truth and never passes it to a method. It is constructed once per task and
shared by every method scored on that task; ``evaluate`` must give each item the same metrics whatever
the batch it is in (the runner's batch-size guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from memeval.api import Method

if TYPE_CHECKING:
    from memeval.models import NeuronModel
    from memeval.tasks import Task


class Protocol:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    accepts: ClassVar[tuple[str, ...]] = ("localizer",)

    @dataclass
    class Data:
        """Schema of the task YAML's ``data`` mapping (typed, with defaults)."""

    @dataclass
    class Params:
        """Schema of the task YAML's ``params`` mapping (typed, with defaults)."""

    @classmethod
    def accepts_for(cls, task: "Task") -> tuple[str, ...]:
        """The method kinds this task takes (a protocol may narrow ``accepts`` by its params)."""
        return cls.accepts

    @classmethod
    def skip_reason(cls, task: "Task", method_cls: type) -> str | None:
        """Why a method of an accepted kind cannot run on this task (it is then skipped with a note), or None."""
        return None

    @classmethod
    def check_task(cls, task: "Task") -> None:
        """Fail fast (a :class:`UsageError`) on what is missing before the model is loaded, e.g. data files."""

    @classmethod
    def model_override_refusal(cls, task: "Task", spec: str) -> str | None:
        """Why ``--model`` cannot replace this task's model, or None. By default a task whose
        ``data.source`` is not ``file`` refuses ``spec``: its sequences (an organism's memorized set, its training
        documents) belong to the model the task names, and would mean nothing on another; another organism
        (``organism:tiny@1``) is accepted by an organism-source task, as it brings its own."""
        source = getattr(task.data, "source", "file")
        if source == "organism" and spec.startswith("organism:"):
            return None  # another organism brings its own data (e.g. another seed: organism:tiny@1)
        if source != "file":
            return (f"its data (data.source: {source}) belong to {task.model}; use a file task "
                    f"(`memeval ls tasks` lists them) with --task-config TASK.data.path=..., or another organism")
        return None

    @classmethod
    def load_model(cls, task: "Task", device, dtype) -> "NeuronModel":
        """The model the runner hands to the protocol (and reloads to restore weights a method changed):
        the task's ``model`` spec loaded as a :class:`NeuronModel`. A protocol that trains its own models
        (detection) returns a lighter handle that still has ``fingerprint()``."""
        from memeval.loading import load_model

        return load_model(task.model, device, dtype, task.model_args)

    def __init__(self, task: "Task", model: "NeuronModel", seed: int) -> None:
        self.task = task
        self.model = model
        self.seed = seed
        self.data: Any = task.data
        self.params: Any = task.params
        self.log_samples = False  # set by the runner for --log-samples (see evaluate)
        self.on_status: Callable[[str], None] = lambda text: None  # set by the runner to show prepare()'s step

    def status(self, text: str) -> None:
        """Say what :meth:`prepare` is doing now (shown beside the preparation's elapsed time)."""
        self.on_status(text)

    def prepare(self) -> None:
        """Build data and ground truth (may be slow; called once, before any method runs)."""

    def items(self) -> list[str]:
        """Item ids in a fixed order; ``--limit N`` takes the first N."""
        raise NotImplementedError

    def dev_items(self) -> list[str]:
        """Item ids held out for tuning hyperparameters (``--split dev``); never part of a ranked run."""
        return []

    def metrics(self) -> dict[str, bool]:
        """Every metric this task reports, mapped to whether higher is better."""
        raise NotImplementedError

    def primary_metric(self) -> str:
        raise NotImplementedError

    def evaluate(self, method: Method, item_ids: list[str]) -> list[dict[str, float]]:
        """Run ``method`` on the items (one batch) and return one metrics dict per item, in order.

        When ``self.log_samples`` is set, a protocol may add to an item's dict the key ``"samples"``: a
        JSON-serializable record of what the model generated (before and after), which the runner writes to
        ``OUTPUT/samples/`` instead of the metrics."""
        raise NotImplementedError
