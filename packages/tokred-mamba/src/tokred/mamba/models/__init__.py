"""Vim and VideoMamba models, their registry and checkpoint loading.

Importing this package registers every model name (see :func:`available_models`).
"""

from tokred.mamba.models.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    extract_state_dict,
    load_checkpoint,
    read_checkpoint,
    resize_pos_embed,
    resize_temporal_pos_embed,
)
from tokred.mamba.models.registry import UnknownModelError, available_models, create_model, register_model
from tokred.mamba.models.videomamba import PatchEmbed3d, VideoMamba, VideoMambaImage
from tokred.mamba.models.vim import MambaClassifier, PatchEmbed, VisionMamba

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "MambaClassifier",
    "PatchEmbed",
    "PatchEmbed3d",
    "UnknownModelError",
    "VideoMamba",
    "VideoMambaImage",
    "VisionMamba",
    "available_models",
    "create_model",
    "extract_state_dict",
    "load_checkpoint",
    "read_checkpoint",
    "register_model",
    "resize_pos_embed",
    "resize_temporal_pos_embed",
]
