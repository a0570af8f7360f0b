"""The exceptions corral raises for problems the user can fix.

The CLI prints a `CorralError` as one message (no traceback); anything else is a bug and keeps
its traceback. Messages name what the user typed: the key, file, line or field, the value
received, what is allowed, and the fix.
"""

from __future__ import annotations


class CorralError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class ConfigError(CorralError):
    """One or more invalid configuration values, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration:\n{lines}")


class DataError(CorralError):
    """A dataset that cannot be read or used (bad line, missing column, empty result)."""


class ModelError(CorralError):
    """A model or adapter that cannot be found or loaded."""


class MissingDependencyError(CorralError):
    """An optional dependency is not installed; the message names the extra to install."""


class ExportError(CorralError):
    """A model that cannot be exported or converted as asked (unsupported, or a failed check)."""
