"""Errors a user can act on. ``str(err)`` is one line: what is wrong and what to do."""

from __future__ import annotations


class DynkvError(Exception):
    """Base class for expected failures (the CLI prints them without a traceback)."""

    exit_code = 1


class UsageError(DynkvError):
    """A setting or argument is wrong (exit code 2)."""

    exit_code = 2


class BudgetError(UsageError):
    """A budget word could not be read."""


class ModelLoadError(DynkvError):
    """A model folder or id could not be loaded."""


class CacheFileError(DynkvError):
    """A saved cache is unreadable or belongs to another model."""


class OutOfMemoryError(DynkvError):
    """The device ran out of memory."""


class CacheTooLargeError(UsageError):
    """The budget's cache would not fit the memory limit (refused before reading; exit code 2)."""
