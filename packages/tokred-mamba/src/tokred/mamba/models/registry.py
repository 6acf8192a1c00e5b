"""A timm-style model registry: ``register_model``, ``create_model``, ``available_models``."""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from tokred.core.errors import RegistryError, TokredError

__all__ = ["UnknownModelError", "available_models", "create_model", "register_model"]

F = TypeVar("F", bound=Callable[..., nn.Module])

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


class UnknownModelError(TokredError, LookupError):
    """A model name that is neither registered nor an alias of a registered model."""

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a dict key
        return str(self.args[0]) if self.args else ""


def register_model(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Register a model factory under ``name`` (and optional alternative names); use as a decorator.

    The factory takes keyword overrides of the model's constructor arguments and returns the model.

    Args:
        name: lower_snake_case model name.
        aliases: Other names that resolve to the same factory (for example the official long Vim names).

    Returns:
        A decorator that registers and returns the factory unchanged.

    Raises:
        RegistryError: If a name is malformed or already taken by a different factory.
    """
    for candidate in (name, *aliases):
        if not isinstance(candidate, str) or not _NAME.match(candidate):
            raise RegistryError(f"model names are lower_snake_case; got {candidate!r}")

    def decorator(factory: F) -> F:
        existing = _FACTORIES.get(name)
        # Re-running a module (importlib.reload, a notebook cell) re-registers the same definition.
        if existing is not None and existing.__qualname__ != factory.__qualname__:
            where = f"{existing.__module__}.{existing.__qualname__}"
            raise RegistryError(f"model {name!r} is already registered by {where}")
        for alias in aliases:
            if alias in _FACTORIES or _ALIASES.get(alias, name) != name:
                raise RegistryError(f"alias {alias!r} already names another model")
        _FACTORIES[name] = factory
        for alias in aliases:
            _ALIASES[alias] = name
        return factory

    return decorator


def _resolve(name: str) -> str:
    if name in _FACTORIES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    known = sorted(_FACTORIES)
    close = difflib.get_close_matches(name, known + sorted(_ALIASES), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownModelError(f"unknown model {name!r}.{hint} Known models: {', '.join(known)}")


def available_models(pattern: str = "*", *, include_aliases: bool = False) -> list[str]:
    """Registered model names matching an fnmatch ``pattern``, sorted.

    Args:
        pattern: Shell-style pattern, for example ``"vim_*"`` or ``"*_f16"``.
        include_aliases: Also list alternative names (the official long Vim names).

    Returns:
        Sorted names.

    Example:
        >>> from tokred.mamba import available_models
        >>> ", ".join(available_models("vim_small*"))
        'vim_small, vim_small_stride8'
    """
    names = set(_FACTORIES) | (set(_ALIASES) if include_aliases else set())
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def create_model(
    name: str,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    checkpoint_key: str | None = "auto",
    trusted: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally loading a checkpoint into it.

    Args:
        name: A name from :func:`available_models`, or an official long Vim name.
        checkpoint: Path to a ``.pth`` file (official container or bare state dict), or an already-loaded
            checkpoint dict. Loaded strictly with :func:`~tokred.mamba.load_checkpoint`.
        checkpoint_key: Which entry of the container holds the weights: ``"auto"`` (``"model"`` if present,
            else a bare state dict), ``"model"``, ``"model_ema"`` (Vim-B's published accuracy is its EMA
            weights), or None for a bare state dict.
        trusted: Allow arbitrary pickled objects in the file (``torch.load(weights_only=False)``); only for
            files you trust.
        **overrides: Constructor arguments that replace the registered defaults, such as ``img_size``,
            ``num_classes``, ``num_frames`` (video models) or ``scan_backend``. When ``img_size``, ``stride`` or
            ``num_frames`` differ from the checkpoint's, its position embeddings are interpolated.

    Returns:
        The model, in training mode like any fresh ``nn.Module``; call ``.eval()`` for inference.

    Raises:
        UnknownModelError: If the name is not registered.
        CheckpointError: If the checkpoint cannot be read or does not fit the model.

    Example:
        >>> import torch
        >>> from tokred.mamba import create_model
        >>> model = create_model("vim_test", num_classes=5).eval()
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 5])
    """
    canonical = _resolve(name)
    try:
        model = _FACTORIES[canonical](**overrides)
    except TypeError as error:
        raise TypeError(f"create_model({name!r}): {error}") from error
    model.model_name = canonical
    if checkpoint is not None:
        from tokred.mamba.models.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint, key=checkpoint_key, trusted=trusted)
    return model
