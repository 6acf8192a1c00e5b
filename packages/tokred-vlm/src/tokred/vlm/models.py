"""The vision-language models :func:`tokred.vlm.attach` supports, and how each lays out its visual tokens.

Everything model-specific lives here: which transformers class belongs to which family, the defaults of
``space`` and ``positions`` (those of ApET's released code), and how one encoded image or video (one entry of
``get_image_features(...).pooler_output``) splits into token groups — crops, frames — and structural tokens
that are always kept (LLaVA-NeXT's row newlines, Video-LLaVA's per-frame class token, LLaVA-OneVision's
video newline). The hooks in :mod:`tokred.vlm.attachment` are the same for every family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["SUPPORTED_MODELS", "EntryLayout", "ModelFamily", "family_of", "supported_model_names"]


@dataclass(frozen=True)
class ModelFamily:
    """One supported model family.

    Attributes:
        name: Short name, e.g. ``"llava_next"``.
        title: Human name, e.g. ``"LLaVA-NeXT"``.
        class_names: transformers classes of the family (subclasses are recognised too).
        modalities: ``("image",)`` or ``("image", "video")``.
        default_space: Where the reducer runs by default: ``"vision"`` (before the projector) or ``"llm"``.
        default_positions: ``"original"`` or ``"compact"`` by default.
        vision_space: Whether ``space="vision"`` is possible: the projector maps vision tokens one-to-one onto
            LLM tokens. Qwen's merger (2×2 patches into one) and LLaVA-OneVision's post-projector pooling do not.
        vision_space_reason: Why ``space="vision"`` is refused, when it is.
    """

    name: str
    title: str
    class_names: tuple[str, ...]
    modalities: tuple[str, ...]
    default_space: Literal["vision", "llm"]
    default_positions: Literal["original", "compact"]
    vision_space: bool
    vision_space_reason: str = ""


_QWEN_MERGER = "its merger combines 2x2 vision patches into one LLM token, so vision tokens do not map one-to-one"

SUPPORTED_MODELS: tuple[ModelFamily, ...] = (
    ModelFamily("llava", "LLaVA-1.5", ("LlavaForConditionalGeneration",), ("image",), "vision", "compact", True),
    ModelFamily(
        "llava_next", "LLaVA-NeXT", ("LlavaNextForConditionalGeneration",), ("image",), "vision", "compact", True
    ),
    ModelFamily(
        "qwen2_vl",
        "Qwen2-VL",
        ("Qwen2VLForConditionalGeneration",),
        ("image", "video"),
        "llm",
        "original",
        False,
        _QWEN_MERGER,
    ),
    ModelFamily(
        "qwen2_5_vl",
        "Qwen2.5-VL",
        ("Qwen2_5_VLForConditionalGeneration",),
        ("image", "video"),
        "llm",
        "original",
        False,
        _QWEN_MERGER,
    ),
    ModelFamily(
        "llava_onevision",
        "LLaVA-OneVision / LLaVA-Video",
        ("LlavaOnevisionForConditionalGeneration",),
        ("image", "video"),
        "llm",
        "compact",
        False,
        "it pools and interpolates features after the projector, so vision tokens do not map one-to-one",
    ),
    ModelFamily(
        "video_llava",
        "Video-LLaVA",
        ("VideoLlavaForConditionalGeneration",),
        ("image", "video"),
        "llm",
        "compact",
        True,
    ),
)
"""The supported model families, with their defaults (those of ApET's released code, see each family's page)."""


def supported_model_names() -> list[str]:
    """The transformers class names :func:`~tokred.vlm.attach` accepts.

    Returns:
        Class names, one per family, in the order of :data:`SUPPORTED_MODELS`.
    """
    return [name for family in SUPPORTED_MODELS for name in family.class_names]


def family_of(model: Any) -> ModelFamily:
    """The family a model belongs to, by its class or the first supported class it derives from.

    Args:
        model: A transformers model.

    Returns:
        Its :class:`ModelFamily`.

    Raises:
        TypeError: If the model is not a supported class; the message lists the supported ones.
    """
    for klass in type(model).__mro__:
        for family in SUPPORTED_MODELS:
            if klass.__name__ in family.class_names:
                return family
    names = ", ".join(supported_model_names())
    raise TypeError(
        f"tokred.vlm does not support {type(model).__name__}; supported models are {names} "
        "(load the checkpoint with its *ForConditionalGeneration class, e.g. AutoModelForImageTextToText)"
    )


@dataclass
class EntryLayout:
    """How one encoded image or video splits into token groups.

    Attributes:
        groups: Long ``(n,)``: the group (crop, frame, image) of each of the entry's ``n`` tokens, counted from 0
            within the entry; ``-1`` marks structural tokens that are always kept and not counted in any budget.
        keep: Optional bool ``(n,)``: the tokens a reducer already kept in vision space (``space="vision"``);
            None when the reduction is still to run on the LLM embeddings.
    """

    groups: torch.Tensor
    keep: torch.Tensor | None = None


def vision_grid(config: Any) -> int:
    """Patches per side of one crop or frame of the model's vision tower.

    Args:
        config: A LLaVA-family model config (with ``vision_config.image_size`` and ``patch_size``).

    Returns:
        ``image_size // patch_size``, e.g. 24 for CLIP-L/14 at 336 px.
    """
    vision = config.vision_config
    return int(vision.image_size) // int(vision.patch_size)


def simple_layouts(
    family: ModelFamily,
    modality: str,
    lengths: list[int],
    *,
    config: Any,
    call_kwargs: dict[str, Any],
    video_groups: str,
) -> list[torch.Tensor]:
    """Group ids of entries that need no packing information (everything but anyres images).

    Args:
        family: The model family.
        modality: ``"image"`` or ``"video"``.
        lengths: Token count of each entry.
        config: The model config.
        call_kwargs: The keyword arguments of the ``get_*_features`` call (Qwen's ``video_grid_thw``).
        video_groups: ``"frame"`` or ``"video"``.

    Returns:
        One long tensor of group ids per entry.
    """
    layouts = []
    if modality == "image" or family.name == "llava":
        for n in lengths:
            groups = torch.zeros(n, dtype=torch.long)
            if family.name == "video_llava" and n == vision_grid(config) ** 2 + 1:
                groups[0] = -1  # "full" strategy keeps the class token: always kept, as ApET does for videos
            layouts.append(groups)
        return layouts
    if family.name == "video_llava":  # one entry per frame: [CLS, patches]
        for n in lengths:
            groups = torch.zeros(n, dtype=torch.long)
            if n == vision_grid(config) ** 2 + 1:
                groups[0] = -1
            layouts.append(groups)
        return layouts
    if family.name == "llava_onevision":  # frames * pooled patches + one trailing newline per video
        per_frame = math.ceil(vision_grid(config) / 2) ** 2
        for n in lengths:
            body = torch.arange(n - 1) // per_frame if video_groups == "frame" else torch.zeros(n - 1, dtype=torch.long)
            layouts.append(torch.cat([body, torch.full((1,), -1)]))
        return layouts
    # Qwen2-VL / Qwen2.5-VL videos: t frames (after temporal patching) of h*w/merge^2 tokens each.
    grid = call_kwargs.get("video_grid_thw")
    merge = int(config.vision_config.spatial_merge_size) ** 2
    for index, n in enumerate(lengths):
        if video_groups == "frame" and grid is not None:
            _, height, width = (int(v) for v in grid[index])
            layouts.append(torch.arange(n) // (height * width // merge))
        else:
            layouts.append(torch.zeros(n, dtype=torch.long))
    return layouts
