"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): images and frames encoded separately, class tokens kept.

Video-LLaVA encodes each video frame on its own, so one entry of its video features is one frame: its class
token (always kept, unreduced) and its patches (one group). Images drop the class token unless the model keeps
it (``vision_feature_select_strategy="full"``), in which case it is kept too. Each entry's projector input maps
one-to-one onto language-model tokens, but ApET's released code reduces Video-LLaVA in the language model's
space, which is the default here as well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tokred.core.errors import IncompatibleReducerError
from tokred.vlm.models.base import ModelAdapter, Positions, Space, VideoGroups, register_adapter

__all__ = ["VideoLlavaAdapter"]


@register_adapter("video_llava")
class VideoLlavaAdapter(ModelAdapter):
    """Video-LLaVA: every image and every frame is a group; per-frame class tokens are always kept."""

    title = "Video-LLaVA"
    model_classes = ("VideoLlavaForConditionalGeneration",)
    modalities = ("image", "video")
    default_space = "llm"
    default_positions = "compact"

    @classmethod
    def check_options(cls, space: Space, positions: Positions, video_groups: VideoGroups) -> None:
        """Video-LLaVA encodes each frame separately, so a whole video cannot be one group."""
        super().check_options(space, positions, video_groups)
        if video_groups == "video":
            raise IncompatibleReducerError(
                "video_groups='video' is not available for Video-LLaVA, which encodes each frame separately; "
                "use video_groups='frame'"
            )

    def _with_class_token(self, length: int) -> bool:
        return length == self.vision_grid() ** 2 + 1

    def entry_groups(
        self, modality: str, lengths: Sequence[int], call: Mapping[str, Any], video_groups: VideoGroups
    ) -> list[torch.Tensor]:
        """One group per entry (an image, or one frame of a video); a class token in front stays."""
        layouts = super().entry_groups(modality, lengths, call, video_groups)
        for groups in layouts:
            if self._with_class_token(len(groups)):
                groups[0] = -1
        return layouts

    def projector_row_groups(self, num_rows: int, length: int) -> torch.Tensor:
        """Rows with a class token in front (video frames, ``"full"`` images) keep it out of the reduction."""
        groups = super().projector_row_groups(num_rows, length)
        if self._with_class_token(length):
            groups[:, 0] = -1
        return groups
