"""Exceptions raised by tokred.

Every error tokred raises on bad input is a subclass of :class:`TokredError` and of the built-in exception a
caller would expect (`ValueError` for a bad value, `LookupError` for an unknown name), so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "PluginLoadError",
    "RegistryError",
    "TokredError",
    "UnknownReducerError",
]


class TokredError(Exception):
    """Base class of every exception tokred raises deliberately."""


class BudgetError(TokredError, ValueError):
    """A token budget that cannot be met (for example more protected tokens than tokens kept)."""


class RegistryError(TokredError, ValueError):
    """A registration that would make a registry ambiguous, such as a name registered twice."""


class UnknownReducerError(TokredError, LookupError):
    """A reducer name that no registration and no installed plug-in provides."""

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a dict key
        return str(self.args[0]) if self.args else ""


class PluginLoadError(TokredError, ImportError):
    """An installed plug-in whose entry point could not be imported.

    The message names the entry point, the distribution that declares it and the original error; the
    original exception is chained as ``__cause__``.
    """
