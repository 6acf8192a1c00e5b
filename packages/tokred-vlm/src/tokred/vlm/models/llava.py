"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one group of tokens per image, a one-to-one vision space.

Each image is ``(image_size / patch_size)²`` tokens (576 for CLIP-L/14 at 336 px; the class token is dropped by
``vision_feature_select_strategy="default"``). The two-layer MLP projector maps every vision token onto one
language-model token, so the reducer can run on the vision tower's features (``space="vision"``, the default,
as in ApET's released LLaVA code).
"""

from __future__ import annotations

from tokred.vlm.models.base import ModelAdapter, register_adapter

__all__ = ["LlavaAdapter"]


@register_adapter("llava")
class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5: every image is one token group; reduced before the projector by default."""

    title = "LLaVA-1.5"
    model_classes = ("LlavaForConditionalGeneration",)
    default_space = "vision"
    default_positions = "compact"
