"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops, each its own group; row newlines kept.

An image becomes a base crop at the tower's resolution plus a grid of high-resolution crops, unpadded to the
image's aspect ratio, with one ``image_newline`` token after every row of the grid (``pack_image_features``).
Every crop is one token group with its own budget; the newlines are structural and always kept. The projector
runs before packing and maps vision tokens one-to-one, so ``space="vision"`` (the default) reduces each crop's
vision features.
"""

from __future__ import annotations

from tokred.vlm.models.base import ModelAdapter, register_adapter

__all__ = ["LlavaNextAdapter"]


@register_adapter("llava_next")
class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT: every anyres crop is a token group, row newlines are always kept."""

    title = "LLaVA-NeXT"
    model_classes = ("LlavaNextForConditionalGeneration",)
    packed_modalities = ("image",)
    default_space = "vision"
    default_positions = "compact"
