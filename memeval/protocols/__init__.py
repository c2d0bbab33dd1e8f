"""Task kinds. Each protocol module defines one :class:`Protocol` subclass."""

from memeval.protocols.base import Protocol

__all__ = ["Protocol"]
