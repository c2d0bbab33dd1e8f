"""memeval: one harness for the methods that localize, edit, predict or detect memorized data in LMs.

Plugin authors import the hook marker and the method base classes from here::

    from memeval import hookimpl
    from memeval.api import Localizer

Users run evaluations from Python with :func:`memeval.evaluate` (:mod:`memeval.evaluation`).
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("memeval")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

hookspec = pluggy.HookspecMarker("memeval")
hookimpl = pluggy.HookimplMarker("memeval")

__all__ = ["__version__", "evaluate", "hookimpl", "hookspec"]


def __getattr__(name: str):
    """``memeval.evaluate`` without importing torch at ``import memeval`` (plugins import this package)."""
    if name == "evaluate":
        from memeval.evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'memeval' has no attribute {name!r}")
