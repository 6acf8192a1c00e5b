"""A timm-style model registry on tokred-core's generic registry: ``register_model``, ``create_model``.

Models are registered in-process with [`register_model`][tokred.mamba.register_model] and, for other
distributions, through the entry-point group ``tokred.models`` (tokred-bench declares its reference Vim
``vim_scenes`` there), so [`create_model`][tokred.mamba.create_model] finds every installed model by name
without anything being imported first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from tokred.core.errors import InvalidInputError, InvalidTypeError, UnknownNameError
from tokred.core.registry import Registry
from tokred.mamba.preprocess import IMAGENET_EVAL, PreprocessConfig

__all__ = [
    "MODELS",
    "MODEL_ENTRY_POINT_GROUP",
    "ModelSpec",
    "UnknownModelError",
    "available_models",
    "create_model",
    "model_spec",
    "register_model",
]

F = TypeVar("F", bound=Callable[..., nn.Module])

MODEL_ENTRY_POINT_GROUP = "tokred.models"
"""Entry-point group through which distributions declare models (``name = "module:factory"``)."""


class UnknownModelError(UnknownNameError):
    """A model name that is neither registered nor an alias of a registered model."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and what comes with it.

    Attributes:
        name: The registry name.
        factory: Builds the model from keyword overrides of its constructor arguments.
        aliases: Other names of the same model (the official long Vim names).
        pretrained: Returns the path of the weights a package bundles for this model
            (``create_model(name, pretrained=True)``), or None when none are bundled.
        preprocess: How the model's input images are prepared (the official ImageNet transform by default).
        class_names: The name of each class, in label order, when the model's classes are known.
    """

    name: str
    factory: Callable[..., nn.Module]
    aliases: tuple[str, ...] = ()
    pretrained: Callable[[], str | os.PathLike[str]] | None = None
    preprocess: PreprocessConfig = IMAGENET_EVAL
    class_names: tuple[str, ...] | None = field(default=None, repr=False)

    @property
    def description(self) -> str:
        """The first line of the factory's docstring."""
        lines = (self.factory.__doc__ or "").strip().splitlines()
        return lines[0].strip() if lines else ""


def _spec_of(loaded: Any) -> ModelSpec:
    """The spec behind an entry point's target: a factory decorated by ``register_model``, or a spec."""
    spec = loaded if isinstance(loaded, ModelSpec) else getattr(loaded, "model_spec", None)
    if not isinstance(spec, ModelSpec):
        raise InvalidTypeError(f"{loaded!r} is not a model factory decorated with tokred.mamba.register_model")
    return spec


MODELS: Registry[ModelSpec] = Registry(
    MODEL_ENTRY_POINT_GROUP, "model", unknown_error=UnknownModelError, from_entry_point=_spec_of
)
"""The Vision Mamba model registry (entry-point group ``tokred.models``)."""


def register_model(
    name: str,
    *,
    aliases: Sequence[str] = (),
    pretrained: Callable[[], str | os.PathLike[str]] | None = None,
    preprocess: PreprocessConfig = IMAGENET_EVAL,
    class_names: Sequence[str] | None = None,
) -> Callable[[F], F]:
    """Register a model factory under ``name``; use as a decorator.

    The factory takes keyword overrides of the model's constructor arguments and returns the model; its
    docstring's first line is the model's description in listings. The decorated factory is returned
    unchanged, with its [`ModelSpec`][tokred.mamba.models.registry.ModelSpec] as ``factory.model_spec``.

    Args:
        name: lower_snake_case model name.
        aliases: Other names that resolve to the same model (for example the official long Vim names).
        pretrained: A function returning the path of bundled weights, for ``create_model(name, pretrained=True)``.
        preprocess: How the model's inputs are prepared, if not the official ImageNet evaluation transform.
        class_names: The name of each class, in label order.

    Returns:
        A decorator that registers and returns the factory.

    Raises:
        RegistryError: If a name is malformed or already taken by a different factory.
    """

    def decorator(factory: F) -> F:
        spec = ModelSpec(
            name,
            factory,
            tuple(aliases),
            pretrained,
            preprocess,
            None if class_names is None else tuple(class_names),
        )
        MODELS.register(name, spec, aliases=aliases)
        factory.model_spec = spec  # type: ignore[attr-defined]
        return factory

    return decorator


def model_spec(name: str) -> ModelSpec:
    """The [`ModelSpec`][tokred.mamba.models.registry.ModelSpec] of a registered model or alias.

    Raises:
        UnknownModelError: If no registered or installed model has that name; the message lists them.
    """
    return MODELS.get(name)


def available_models(pattern: str = "*", *, include_aliases: bool = False) -> list[str]:
    """Registered model names matching an fnmatch ``pattern``, sorted.

    Models of other installed distributions (entry-point group ``tokred.models``) are listed without being
    imported.

    Args:
        pattern: Shell-style pattern, for example ``"vim_*"`` or ``"*_f16"``.
        include_aliases: Also list alternative names (the official long Vim names).

    Returns:
        Sorted names.

    Examples:
        >>> from tokred.mamba import available_models
        >>> ", ".join(available_models("vim_small*"))
        'vim_small, vim_small_stride8'
    """
    return MODELS.names(pattern, include_aliases=include_aliases)


def create_model(
    name: str,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    pretrained: bool = False,
    checkpoint_key: str | None = "auto",
    trusted: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally loading a checkpoint or the weights a package bundles for it.

    The model carries what its registration says about it: ``model.model_name``, ``model.preprocess_config``
    (how to prepare its input images, for [`load_image`][tokred.mamba.load_image]) and ``model.class_names``
    (None when the classes are not known, or when ``num_classes`` was overridden).

    Args:
        name: A name from [`available_models`][tokred.mamba.available_models], or an official long Vim name.
        checkpoint: Path to a ``.pth`` file (official container or bare state dict), or an already-loaded
            checkpoint dict. Loaded strictly with [`load_checkpoint`][tokred.mamba.load_checkpoint].
        pretrained: Load the weights bundled for this model (``vim_scenes``, from tokred-bench). Not together
            with ``checkpoint``.
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
        InvalidInputError: If ``pretrained`` is asked for a model without bundled weights, or together with a
            checkpoint.
        CheckpointError: If the checkpoint cannot be read or does not fit the model.

    Examples:
        >>> import torch
        >>> from tokred.mamba import create_model
        >>> model = create_model("vim_test", num_classes=5).eval()
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 5])
    """
    spec = MODELS.get(name)
    if pretrained:
        if checkpoint is not None:
            raise InvalidInputError("give pretrained=True or a checkpoint, not both")
        if spec.pretrained is None:
            with_weights = [n for n in MODELS.names() if MODELS.get(n).pretrained is not None]
            listed = ", ".join(with_weights) or "none installed"
            raise InvalidInputError(
                f"model {spec.name!r} has no bundled weights; pass checkpoint=PATH (models with bundled weights: "
                f"{listed})"
            )
        checkpoint = Path(spec.pretrained())
    try:
        model = spec.factory(**overrides)
    except TypeError as error:
        raise InvalidTypeError(f"create_model({name!r}): {error}") from error
    model.model_name = spec.name
    model.preprocess_config = spec.preprocess
    names = spec.class_names
    model.class_names = names if names is not None and len(names) == getattr(model, "num_classes", -1) else None
    if checkpoint is not None:
        from tokred.mamba.models.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint, key=checkpoint_key, trusted=trusted)
    return model
