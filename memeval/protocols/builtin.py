"""memeval's own plugin: the built-in protocols and the built-in task folder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from memeval import hookimpl


@hookimpl
def memeval_protocols() -> list[type]:
    from memeval.protocols.deletion import DeletionProtocol
    from memeval.protocols.detection import DetectionProtocol
    from memeval.protocols.injection import InjectionProtocol
    from memeval.protocols.prediction import PredictionProtocol
    from memeval.protocols.specificity import SpecificityProtocol

    return [InjectionProtocol, DeletionProtocol, SpecificityProtocol, DetectionProtocol, PredictionProtocol]


@hookimpl
def memeval_task_dirs() -> list[Path]:
    return [Path(str(resources.files("memeval_tasks")))]
