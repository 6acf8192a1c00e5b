"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): images and videos, 3-D M-RoPE, no one-to-one vision space.

An image is ``t·h·w / merge²`` tokens (``t = 1``); a video the same with ``t`` temporal patches, each a frame
group of ``h·w / merge²`` tokens (``video_groups="frame"``) or one group per video (``"video"``). The merger
combines 2 x 2 vision patches into one language-model token, so the reducer runs on the language model's
embeddings (``space="llm"``), and positions stay the original 3-D M-RoPE positions by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tokred.vlm.models.base import ModelAdapter, VideoGroups, frames_of_grid, register_adapter

__all__ = ["QWEN_MERGER", "Qwen2VLAdapter"]

QWEN_MERGER = "its merger combines 2x2 vision patches into one LLM token, so vision tokens do not map one-to-one"
"""Why Qwen models have no vision space."""


@register_adapter("qwen2_vl")
class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL: an image is one group, a video one group per frame; M-RoPE positions kept."""

    title = "Qwen2-VL"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    modalities = ("image", "video")
    default_space = "llm"
    default_positions = "original"
    vision_space_refusal = QWEN_MERGER

    def entry_groups(
        self, modality: str, lengths: Sequence[int], call: Mapping[str, Any], video_groups: VideoGroups
    ) -> list[torch.Tensor]:
        """An image is one group; a video a group per temporal patch (frame), read off ``video_grid_thw``."""
        if modality == "image" or video_groups == "video":
            return super().entry_groups(modality, lengths, call, video_groups)
        grid = call.get("video_grid_thw")
        if grid is None:  # without the grid the frames cannot be told apart: the video is one group
            return super().entry_groups(modality, lengths, call, video_groups)
        merge = int(self.config.vision_config.spatial_merge_size) ** 2
        return [frames_of_grid(n, int(grid[i][1]), int(grid[i][2]), merge) for i, n in enumerate(lengths)]
