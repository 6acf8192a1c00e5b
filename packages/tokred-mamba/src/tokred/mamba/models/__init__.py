"""Vim and VideoMamba models, their registry and checkpoint loading.

Importing this package registers every model name (see
[`available_models`][tokred.mamba.models.registry.available_models]).
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
from tokred.mamba.models.registry import (
    MODELS,
    ModelSpec,
    UnknownModelError,
    available_models,
    create_model,
    model_spec,
    register_model,
)
from tokred.mamba.models.videomamba import PatchEmbed3d, VideoMamba, VideoMambaImage
from tokred.mamba.models.vim import MambaClassifier, PatchEmbed, VisionMamba

__all__ = [
    "MODELS",
    "CheckpointError",
    "LoadedCheckpoint",
    "MambaClassifier",
    "ModelSpec",
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
    "model_spec",
    "read_checkpoint",
    "register_model",
    "resize_pos_embed",
    "resize_temporal_pos_embed",
]
