"""The adapter interface: everything tokred.vlm needs to know about one model family, and their registry.

[`attach`][tokred.vlm.attach] works the same way for every model: it records how each encoded image or video
splits into token groups, finds the visual placeholders of a call, and shortens the sequence the language model
sees. What differs between families is collected in one [`ModelAdapter`][tokred.vlm.models.ModelAdapter]
subclass per family, one module each under ``tokred/vlm/models/``:

* which transformers classes belong to the family, and which modalities (image, video) it takes;
* how one encoded image or video (one entry of ``get_image_features(...).pooler_output``) splits into token
  groups (crops, frames) and structural tokens that are always kept (LLaVA-NeXT's row newlines, Video-LLaVA's
  per-frame class token, LLaVA-OneVision's video newline);
* whether a vision space exists — the projector maps vision tokens one-to-one onto language-model tokens — and
  why not when it does not;
* the defaults of ``space`` and ``positions`` (those of ApET's released code).

Adapters are found through a [`Registry`][tokred.core.Registry] (entry-point group ``tokred.vlm_adapters`` for
families shipped by other packages); the docs page *Adding a model family* walks through adding one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tokred.core.errors import IncompatibleReducerError, InvalidInputError, InvalidTypeError, RegistryError
from tokred.core.registry import Registry

__all__ = [
    "ADAPTERS",
    "ADAPTER_ENTRY_POINT_GROUP",
    "ModelAdapter",
    "Positions",
    "Space",
    "VideoGroups",
    "adapter_class_for",
    "available_adapters",
    "register_adapter",
]

Space = Literal["vision", "llm"]
Positions = Literal["original", "compact"]
VideoGroups = Literal["frame", "video"]

ADAPTER_ENTRY_POINT_GROUP = "tokred.vlm_adapters"
"""Entry-point group through which other distributions add model families (``name = "module:AdapterClass"``)."""


class ModelAdapter:
    """What tokred.vlm needs to know about one model family; subclass it once per family.

    The class attributes describe the family; the methods answer questions about one model instance (its
    config) and one encoding call. The defaults fit a LLaVA-1.5-like model: one image is one group of
    tokens, the projector is ``model.model.multi_modal_projector`` and maps vision tokens one-to-one.

    Attributes:
        name: Registry name, set by [`register_adapter`][tokred.vlm.models.register_adapter] (``"llava"``).
        title: Human name (``"LLaVA-1.5"``).
        model_classes: Names of the transformers ``*ForConditionalGeneration`` classes of the family; a model
            whose class or a base class has one of these names is served by this adapter.
        modalities: ``("image",)`` or ``("image", "video")``: the ``get_{modality}_features`` methods the
            model has.
        packed_modalities: Modalities whose features go through the model's anyres ``pack_image_features``
            (LLaVA-NeXT, LLaVA-OneVision images); groups are then the crops, read off the packing itself.
        default_space: Where the reducer runs unless ``attach(space=...)`` says otherwise.
        default_positions: The positions kept tokens get unless ``attach(positions=...)`` says otherwise.
        vision_space_refusal: Why ``space="vision"`` is impossible for this family, or None when the projector
            maps vision tokens one-to-one onto language-model tokens.

    Args:
        model: The model instance.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    packed_modalities: ClassVar[tuple[str, ...]] = ()
    default_space: ClassVar[Space] = "llm"
    default_positions: ClassVar[Positions] = "compact"
    vision_space_refusal: ClassVar[str | None] = None

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config

    # ------------------------------------------------------------------------------------------------ family
    @classmethod
    def matches(cls, model: Any) -> bool:
        """Whether ``model`` belongs to this family: its class, or a class it derives from, is named in
        ``model_classes``.
        """  # noqa: D205
        return any(klass.__name__ in cls.model_classes for klass in type(model).__mro__)

    @classmethod
    def check_options(cls, space: Space, positions: Positions, video_groups: VideoGroups) -> None:
        """Refuse option combinations this family cannot run, saying what to pass instead.

        Raises:
            IncompatibleReducerError: For ``space="vision"`` without a vision space.
        """
        if space == "vision" and cls.vision_space_refusal is not None:
            raise IncompatibleReducerError(
                f"space='vision' is not possible for {cls.title}: {cls.vision_space_refusal}; use space='llm'"
            )

    # ---------------------------------------------------------------------------------------------- tokens
    def placeholder_id(self, modality: str) -> int | None:
        """The placeholder token id of ``modality``: ``config.image_token_id`` (or the older ``image_token_index``)."""
        token_id = getattr(self.config, f"{modality}_token_id", None)
        return token_id if token_id is not None else getattr(self.config, f"{modality}_token_index", None)

    def vision_grid(self) -> int:
        """Patches per side of one crop or frame of the vision tower (24 for CLIP-L/14 at 336 px)."""
        vision = self.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    def entry_groups(
        self, modality: str, lengths: Sequence[int], call: Mapping[str, Any], video_groups: VideoGroups
    ) -> list[torch.Tensor]:
        """The token group of every token of every entry one ``get_{modality}_features`` call returned.

        Not called for ``packed_modalities``, whose groups come from the packing.

        Args:
            modality: ``"image"`` or ``"video"``.
            lengths: Tokens of each entry (``len(pooler_output[i])``).
            call: The arguments of the call by name (for example Qwen's ``video_grid_thw``).
            video_groups: ``"frame"`` (a group per frame) or ``"video"`` (one group per video).

        Returns:
            One long tensor ``(n_i,)`` per entry: group ids counted from 0 within the entry, ``-1`` for structural
            tokens that are always kept and count towards no budget. The default: every entry is one group.
        """
        return [torch.zeros(n, dtype=torch.long) for n in lengths]

    # ------------------------------------------------------------------------------------------ vision space
    def projector(self) -> nn.Module:
        """The module mapping vision features onto language-model embeddings (``space="vision"`` reduces its input)."""
        return self.model.model.multi_modal_projector

    def projector_row_groups(self, num_rows: int, length: int) -> torch.Tensor:
        """Group labels of the projector's input ``(R, n, C)``: ``0`` for reducible tokens, ``-1`` for structural.

        Every row (image, crop or frame) is reduced on its own. The default has no structural tokens.

        Returns:
            Long tensor ``(R, n)``.
        """
        return torch.zeros((num_rows, length), dtype=torch.long)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"


def _check_adapter(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise RegistryError(f"only ModelAdapter subclasses can be registered as model families; got {cls!r}")
    if not cls.model_classes or not cls.title:
        raise RegistryError(f"{cls.__name__} must set title and model_classes")
    if cls.default_space == "vision" and cls.vision_space_refusal is not None:
        raise RegistryError(f"{cls.__name__} defaults to space='vision' but refuses it")
    cls.name = name


ADAPTERS: Registry[type[ModelAdapter]] = Registry(ADAPTER_ENTRY_POINT_GROUP, "model family", on_register=_check_adapter)
"""The model-family registry (entry-point group ``tokred.vlm_adapters``)."""


def register_adapter(name: str) -> Any:
    """Class decorator that registers a [`ModelAdapter`][tokred.vlm.models.ModelAdapter] subclass under ``name``.

    Args:
        name: lower_snake_case family name, such as the transformers ``model_type`` (``"llava_next"``).

    Raises:
        RegistryError: If the name is malformed or taken, or the class is not a complete adapter.
    """
    return ADAPTERS.register(name)


def available_adapters() -> list[type[ModelAdapter]]:
    """Every registered adapter class, in name order (importing plug-in families)."""
    return [ADAPTERS.get(name) for name in ADAPTERS.names()]


def adapter_class_for(model: Any) -> type[ModelAdapter]:
    """The adapter class of the family ``model`` belongs to.

    Raises:
        InvalidTypeError: If no registered family serves the model's class; the message lists the supported ones.
    """
    adapters = available_adapters()
    for klass in type(model).__mro__:  # the most derived class decides, so subclasses of a family stay in it
        for adapter in adapters:
            if klass.__name__ in adapter.model_classes:
                return adapter
    names = ", ".join(name for adapter in adapters for name in adapter.model_classes)
    raise InvalidTypeError(
        f"tokred.vlm does not support {type(model).__name__}; supported models are {names} "
        "(load the checkpoint with its *ForConditionalGeneration class, e.g. AutoModelForImageTextToText)"
    )


def frames_of_grid(length: int, height: int, width: int, merge: int) -> torch.Tensor:
    """Frame id of each of a video's ``length`` tokens when every frame holds ``height * width / merge`` of them."""
    per_frame = height * width // merge
    if per_frame <= 0 or length % per_frame:
        raise InvalidInputError(f"a video of {length} tokens does not split into frames of {per_frame} tokens")
    return torch.arange(length) // per_frame


def pooled_side(grid: int) -> int:
    """Patches per side after LLaVA-OneVision's 2x bilinear pooling of the video frames."""
    return math.ceil(grid / 2)
