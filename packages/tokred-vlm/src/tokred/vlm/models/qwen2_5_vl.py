"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's token layout with a window-attention tower.

For token reduction it is laid out exactly as Qwen2-VL (see [`tokred.vlm.models.qwen2_vl`][tokred.vlm.models.qwen2_vl]);
only the class and the title differ.
"""

from __future__ import annotations

from tokred.vlm.models.base import register_adapter
from tokred.vlm.models.qwen2_vl import Qwen2VLAdapter

__all__ = ["Qwen25VLAdapter"]


@register_adapter("qwen2_5_vl")
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: an image is one group, a video one group per frame; M-RoPE positions kept."""

    title = "Qwen2.5-VL"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
