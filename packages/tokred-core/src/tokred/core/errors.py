"""Exceptions raised by tokred.

Every error tokred raises on purpose is a [`TokredError`][tokred.core.errors.TokredError] and, at the same time,
the built-in exception a caller would expect (`ValueError` for a bad value, `TypeError` for a wrong type,
`LookupError` for an unknown name, `FileNotFoundError` for a missing file, …). Existing ``except ValueError``
code keeps working, and ``except TokredError`` catches everything tokred raises deliberately, which is how the
``tokred`` command tells a user's mistake (one line, exit status 2) from a bug (a traceback).

Examples:
    >>> from tokred.core import create_reducer
    >>> from tokred.core.errors import BudgetError, TokredError
    >>> try:
    ...     create_reducer("tome", num_keep=0)
    ... except TokredError as error:
    ...     print(type(error).__name__, isinstance(error, ValueError))
    BudgetError True
"""

from __future__ import annotations

__all__ = [
    "AttachError",
    "BudgetError",
    "IncompatibleReducerError",
    "InvalidInputError",
    "InvalidTypeError",
    "MissingDependencyError",
    "MissingFileError",
    "PluginLoadError",
    "ReducerContractError",
    "RegistryError",
    "TokredError",
    "UnknownNameError",
    "UnknownReducerError",
    "UnsupportedError",
]


class TokredError(Exception):
    """Base class of every exception tokred raises deliberately."""


class InvalidInputError(TokredError, ValueError):
    """A value tokred cannot use: a tensor of the wrong shape, a number out of range, an unknown option."""


class InvalidTypeError(TokredError, TypeError):
    """An argument of the wrong type, such as a reducer class where an instance is expected."""


class BudgetError(InvalidInputError):
    """A token budget that cannot be met (for example more protected tokens than tokens kept)."""


class IncompatibleReducerError(InvalidInputError):
    """A reducer that cannot run where it is attached.

    It needs scores the model cannot supply, or it carries a budget that the model's schedule would override.
    """


class RegistryError(TokredError, ValueError):
    """A registration that would make a registry ambiguous, such as a name registered twice."""


class UnknownNameError(TokredError, LookupError):
    """A name that no registry entry and no installed plug-in provides (a reducer, a model, a model family)."""

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a dict key
        return str(self.args[0]) if self.args else ""


class UnknownReducerError(UnknownNameError):
    """A reducer name that no registration and no installed plug-in provides."""


class PluginLoadError(TokredError, ImportError):
    """An installed plug-in whose entry point could not be imported.

    The message names the entry point, the distribution that declares it and the original error; the
    original exception is chained as ``__cause__``.
    """


class MissingDependencyError(TokredError, ImportError):
    """An optional dependency that a requested feature needs is not installed; the message says what to install."""


class MissingFileError(TokredError, FileNotFoundError):
    """A file or folder that was named does not exist, or is a file where a folder is expected (or the reverse)."""


class UnsupportedError(TokredError, NotImplementedError):
    """A combination tokred does not support (for example a chunked prefill with reduced visual tokens)."""


class AttachError(TokredError, RuntimeError):
    """Attaching to a model that is in the wrong state, such as one that already has a reducer attached."""


class ReducerContractError(TokredError, RuntimeError):
    """A reducer broke its contract, for example by returning more or fewer tokens than its budget."""
