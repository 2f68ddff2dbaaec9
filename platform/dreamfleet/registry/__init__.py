"""The expert registry (see :mod:`dreamfleet.registry.store`)."""

from dreamfleet.registry.store import Registry, SubjectState

__all__ = ["Registry", "SubjectState"]
