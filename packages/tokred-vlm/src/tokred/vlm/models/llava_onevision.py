"""LLaVA-OneVision and LLaVA-Video (``LlavaOnevisionForConditionalGeneration``): anyres images, pooled videos.

Images are tiled as in LLaVA-NeXT (plus the ``anyres_max_9`` down-scaling), each crop its own group; an image in
a row with several images is one base crop and a newline. A video is its frames' tokens after 2x bilinear
pooling, ``ceil(grid / 2)²`` per frame, and one trailing ``image_newline`` that is always kept. The pooling runs
after the projector, so vision tokens do not map one-to-one and the reducer runs on the language model's
embeddings (``space="llm"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tokred.vlm.models.base import ModelAdapter, VideoGroups, pooled_side, register_adapter

__all__ = ["LlavaOnevisionAdapter"]


@register_adapter("llava_onevision")
class LlavaOnevisionAdapter(ModelAdapter):
    """LLaVA-OneVision / LLaVA-Video: anyres crops and video frames are groups; newlines are always kept."""

    title = "LLaVA-OneVision / LLaVA-Video"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    modalities = ("image", "video")
    packed_modalities = ("image",)
    default_space = "llm"
    default_positions = "compact"
    vision_space_refusal = (
        "it pools and interpolates features after the projector, so vision tokens do not map one-to-one"
    )

    def entry_groups(
        self, modality: str, lengths: Sequence[int], call: Mapping[str, Any], video_groups: VideoGroups
    ) -> list[torch.Tensor]:
        """A video: frames of pooled patches (one group each, or one for the video) and a trailing newline."""
        per_frame = pooled_side(self.vision_grid()) ** 2
        layouts = []
        for n in lengths:
            frame = video_groups == "frame"
            body = torch.arange(n - 1) // per_frame if frame else torch.zeros(n - 1, dtype=torch.long)
            layouts.append(torch.cat([body, torch.full((1,), -1)]))
        return layouts
