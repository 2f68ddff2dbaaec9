"""Errors that reach the user.

Every error raised for a user mistake is a :class:`DreamfleetError`: the CLI prints its
message (which names the file, subject or field and what to do) without a stack trace.
"""

from __future__ import annotations


class DreamfleetError(Exception):
    """A problem the user can fix; the message says what and how."""


class DataError(DreamfleetError):
    """Input images or manifests that cannot be used."""


class ConfigError(DreamfleetError):
    """A configuration value that is missing, of the wrong type or inconsistent."""


class ModelError(DreamfleetError):
    """A base model that cannot be found or loaded."""
