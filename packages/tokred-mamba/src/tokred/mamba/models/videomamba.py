"""VideoMamba (OpenGVLab/VideoMamba) image and video classifiers, with the official module names.

Shapes: ``B`` batch, ``T`` frames, ``M`` patches, ``L`` tokens, ``D`` model width, ``C`` classes.

The blocks are Vim's, with two differences (those of the official VideoMamba code): the class token sits at
position 0, and the two scan directions are summed, not averaged. The video models embed each frame with a ``Conv3d`` of
temporal kernel 1, add the spatial position embedding (shared by all frames) and a per-frame temporal one,
flatten frame-major (all patches of frame 0, then frame 1, …) and put one class token in front:
``L = T · M + 1``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokred.core.errors import InvalidInputError
from tokred.mamba.models.checkpoint import resize_temporal_pos_embed
from tokred.mamba.models.registry import register_model
from tokred.mamba.models.vim import MambaClassifier, VisionMamba, _grid_side, build

__all__ = [
    "PatchEmbed3d",
    "VideoMamba",
    "VideoMambaImage",
    "videomamba_base",
    "videomamba_middle",
    "videomamba_middle_f8",
    "videomamba_middle_f16",
    "videomamba_small",
    "videomamba_small_f8",
    "videomamba_small_f16",
    "videomamba_test",
    "videomamba_tiny",
    "videomamba_tiny_f8",
    "videomamba_tiny_f16",
    "videomamba_video_test",
]


class VideoMambaImage(VisionMamba):
    """VideoMamba image classifier: Vim with the class token first and the scan directions summed.

    Takes the arguments of [`VisionMamba`][tokred.mamba.models.vim.VisionMamba]; only the defaults of
    ``cls_position`` (``"first"``) and ``divide_out`` (False) differ. State-dict keys are those of the
    ``videomamba_{t,s,m,b}16_in1k_res224.pth`` files.

    Shapes:
        Input ``(B, 3, img_size, img_size)``, output ``(B, C)``.
    """

    def __init__(self, *args: Any, cls_position: str = "first", divide_out: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, cls_position=cls_position, divide_out=divide_out, **kwargs)


class PatchEmbed3d(nn.Module):
    """Per-frame patch embedding of a clip: ``Conv3d`` with kernel and stride ``(1, patch, patch)``.

    Args:
        patch_size: Patch side in pixels.
        in_chans: Input channels.
        embed_dim: ``D``.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 192) -> None:
        super().__init__()
        kernel = (1, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Embed ``video`` ``(B, 3, T, H, W)``; returns ``(B, D, T, H / patch, W / patch)``."""
        return self.proj(video)


class VideoMamba(MambaClassifier):
    """VideoMamba video classifier (``video_sm/models/videomamba.py``), spatial-first scan order.

    State-dict keys: ``patch_embed.proj.*`` (``Conv3d``), ``cls_token``, ``pos_embed`` ``(1, M + 1, D)``,
    ``temporal_pos_embedding`` ``(1, T, D)``, ``layers.{i}.*``, ``norm_f.weight``, ``head.*``, as in the
    ``videomamba_{t,s,m}16_k400_f{8,16}_res224.pth`` files.

    Args:
        img_size: Frame side in pixels (square frames).
        patch_size: Patch side in pixels.
        num_frames: ``T``, frames per clip.
        in_chans: Input channels.
        num_classes: ``C`` (400 for Kinetics-400).
        embed_dim: ``D``.
        depth: Number of blocks.
        divide_out: Halve the sum of the two scan directions (VideoMamba: False).
        **kwargs: Passed to [`MambaClassifier`][tokred.mamba.models.vim.MambaClassifier].

    Shapes:
        Input ``(B, 3, T, img_size, img_size)``, output ``(B, C)``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        num_frames: int = 8,
        in_chans: int = 3,
        num_classes: int = 400,
        embed_dim: int = 192,
        depth: int = 24,
        divide_out: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, depth=depth, num_classes=num_classes, divide_out=divide_out, **kwargs)
        if num_frames < 1:
            raise InvalidInputError(f"num_frames must be at least 1; got {num_frames}")
        side = _grid_side(img_size, patch_size, patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.stride = patch_size
        self.in_chans = in_chans
        self.num_frames = num_frames
        self.grid_size = (side, side)
        self.num_patches = num_frames * side * side
        self.cls_position = "first"
        self.cls_index = 0
        self.patch_embed = PatchEmbed3d(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side + 1, embed_dim))
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self._init_weights()

    def _check_input(self, video: torch.Tensor) -> None:
        expected = (self.in_chans, self.num_frames, self.img_size, self.img_size)
        if video.ndim != 5 or video.shape[1] != self.in_chans:
            raise InvalidInputError(
                f"{type(self).__name__} expects clips of shape (B, {', '.join(map(str, expected))}) "
                f"(B, channels, frames, height, width); got {tuple(video.shape)}"
            )
        frames, height, width = video.shape[2:]
        if frames != self.num_frames:
            raise InvalidInputError(
                f"this model was built for {self.num_frames}-frame clips but got {frames} frames; sample "
                f"{self.num_frames} frames, or build a model with create_model({self._model_hint()}, "
                f"num_frames={frames}) (a checkpoint loaded into it has its temporal embedding interpolated)"
            )
        if (height, width) != (self.img_size, self.img_size):
            raise InvalidInputError(
                f"this model was built for {self.img_size}×{self.img_size} frames but got {height}×{width}; "
                f"resize and center-crop to {self.img_size}, or build a model with "
                f"create_model({self._model_hint()}, img_size={max(height, width)}) (square frames)"
            )

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """Embed ``video`` ``(B, 3, T, H, W)`` frame-major with one leading class token: ``(B, T·M + 1, D)``."""
        self._check_input(video)
        patches = self.patch_embed(video)  # (B, D, T, h, w)
        batch, dim, frames = patches.shape[:3]
        patches = patches.permute(0, 2, 3, 4, 1).reshape(batch, frames, -1, dim)  # (B, T, M, D)
        patches = patches + self.pos_embed[:, None, 1:]  # the spatial embedding, shared by all frames
        patches = patches + self.temporal_pos_embedding[:, :, None]  # one temporal entry per frame
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
        hidden = torch.cat((cls, patches.reshape(batch, -1, dim)), dim=1)  # (B, L, D)
        return self.pos_drop(hidden)

    @property
    def pos_embed_cls_index(self) -> int:
        """Index of the class token's entry in ``pos_embed`` (0: the per-frame layout it was trained with)."""
        return 0

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Resize ``pos_embed`` (bicubic) and ``temporal_pos_embedding`` (linear over frames), in place.

        Also inflates a 2-D image patch embedding ``(D, 3, P, P)`` to this model's ``(D, 3, 1, P, P)``, so an
        ImageNet VideoMamba checkpoint can initialise a video model (load it with ``strict=False``: it has no
        ``temporal_pos_embedding``).

        Returns:
            The keys that were changed.
        """
        resized = super().adapt_state_dict(state_dict)
        temporal = state_dict.get("temporal_pos_embedding")
        own = self.temporal_pos_embedding
        # Only a different frame count is adapted; anything else is left for the shape check to report.
        if (
            isinstance(temporal, torch.Tensor)
            and temporal.ndim == 3
            and temporal.shape != own.shape
            and temporal.shape[-1] == own.shape[-1]
        ):
            state_dict["temporal_pos_embedding"] = resize_temporal_pos_embed(temporal, self.num_frames)
            resized.append("temporal_pos_embedding")
        weight = state_dict.get("patch_embed.proj.weight")
        if isinstance(weight, torch.Tensor) and weight.ndim == 4 and weight.shape[0] == self.embed_dim:
            state_dict["patch_embed.proj.weight"] = weight.unsqueeze(2)
            resized.append("patch_embed.proj.weight")
        return resized


_IMAGE_SIZES = {"tiny": (192, 24), "small": (384, 24), "middle": (576, 32), "base": (768, 24)}


def _image(size: str, overrides: dict[str, Any]) -> VideoMambaImage:
    dim, depth = _IMAGE_SIZES[size]
    return build(VideoMambaImage, {"embed_dim": dim, "depth": depth}, overrides)


def _video(size: str, frames: int, overrides: dict[str, Any]) -> VideoMamba:
    dim, depth = _IMAGE_SIZES[size]
    return build(VideoMamba, {"embed_dim": dim, "depth": depth, "num_frames": frames}, overrides)


@register_model("videomamba_tiny")
def videomamba_tiny(**overrides: Any) -> VideoMambaImage:
    """VideoMamba-Ti on ImageNet: D = 192, 24 blocks, 7 M parameters (``videomamba_t16_in1k_res224.pth``, 76.9 %)."""
    return _image("tiny", overrides)


@register_model("videomamba_small")
def videomamba_small(**overrides: Any) -> VideoMambaImage:
    """VideoMamba-S on ImageNet: D = 384, 24 blocks, 26 M parameters (``videomamba_s16_in1k_res224.pth``, 81.2 %)."""
    return _image("small", overrides)


@register_model("videomamba_middle")
def videomamba_middle(**overrides: Any) -> VideoMambaImage:
    """VideoMamba-M on ImageNet: D = 576, 32 blocks, 74 M parameters (``videomamba_m16_in1k_res224.pth``, 82.8 %)."""
    return _image("middle", overrides)


@register_model("videomamba_base")
def videomamba_base(**overrides: Any) -> VideoMambaImage:
    """VideoMamba-B on ImageNet: D = 768, 24 blocks, 98 M parameters (``videomamba_b16_in1k_res224.pth``, 82.7 %)."""
    return _image("base", overrides)


@register_model("videomamba_tiny_f8")
def videomamba_tiny_f8(**overrides: Any) -> VideoMamba:
    """VideoMamba-Ti on Kinetics-400, 8 frames (1,569 tokens): ``videomamba_t16_k400_f8_res224.pth``."""
    return _video("tiny", 8, overrides)


@register_model("videomamba_tiny_f16")
def videomamba_tiny_f16(**overrides: Any) -> VideoMamba:
    """VideoMamba-Ti on Kinetics-400, 16 frames (3,137 tokens): ``videomamba_t16_k400_f16_res224.pth``."""
    return _video("tiny", 16, overrides)


@register_model("videomamba_small_f8")
def videomamba_small_f8(**overrides: Any) -> VideoMamba:
    """VideoMamba-S on Kinetics-400, 8 frames: ``videomamba_s16_k400_f8_res224.pth``."""
    return _video("small", 8, overrides)


@register_model("videomamba_small_f16")
def videomamba_small_f16(**overrides: Any) -> VideoMamba:
    """VideoMamba-S on Kinetics-400, 16 frames: ``videomamba_s16_k400_f16_res224.pth``."""
    return _video("small", 16, overrides)


@register_model("videomamba_middle_f8")
def videomamba_middle_f8(**overrides: Any) -> VideoMamba:
    """VideoMamba-M on Kinetics-400, 8 frames: ``videomamba_m16_k400_f8_res224.pth``."""
    return _video("middle", 8, overrides)


@register_model("videomamba_middle_f16")
def videomamba_middle_f16(**overrides: Any) -> VideoMamba:
    """VideoMamba-M on Kinetics-400, 16 frames: ``videomamba_m16_k400_f16_res224.pth``."""
    return _video("middle", 16, overrides)


@register_model("videomamba_test")
def videomamba_test(**overrides: Any) -> VideoMambaImage:
    """A tiny VideoMamba image model for tests: 64 px, 16 patches + cls, D = 32, 4 blocks, 10 classes."""
    return build(VideoMambaImage, {"img_size": 64, "embed_dim": 32, "depth": 4, "num_classes": 10}, overrides)


@register_model("videomamba_video_test")
def videomamba_video_test(**overrides: Any) -> VideoMamba:
    """A tiny VideoMamba video model for tests: 4 frames of 32 px, 4 · 4 patches + cls, D = 32, 4 blocks."""
    defaults = {"img_size": 32, "num_frames": 4, "embed_dim": 32, "depth": 4, "num_classes": 10}
    return build(VideoMamba, defaults, overrides)
