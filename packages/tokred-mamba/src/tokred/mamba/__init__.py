"""tokred-mamba: Vision Mamba models in pure PyTorch and MTR token reduction.

Vim and VideoMamba with the module names of the official checkpoints, a timm-style registry, safe checkpoint
loading, the evaluation preprocessing, the selective-scan backends, and token reduction inside the models.

Examples:
    >>> import torch
    >>> from tokred.mamba import MTR, attach, create_model
    >>> model = create_model("vim_test").eval()            # create_model("vim_small", "vim_s_….pth") for real
    >>> images = torch.randn(2, 3, model.img_size, model.img_size)
    >>> with attach(model, MTR(), flops_cut=0.3):
    ...     model(images).shape
    torch.Size([2, 10])
"""

from importlib import metadata as _metadata

from tokred.mamba.flops import count_flops
from tokred.mamba.methods import MTR, ToPViMReducer, UTRReducer
from tokred.mamba.models import (
    CheckpointError,
    LoadedCheckpoint,
    MambaClassifier,
    ModelSpec,
    UnknownModelError,
    VideoMamba,
    VideoMambaImage,
    VisionMamba,
    available_models,
    create_model,
    load_checkpoint,
    model_spec,
    register_model,
)
from tokred.mamba.preprocess import (
    IMAGENET_EVAL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolder,
    PreprocessConfig,
    load_image,
    preprocess_image,
)
from tokred.mamba.reduction import Attachment, ForwardStats, ImagePlan, attach
from tokred.mamba.schedule import solve_schedule

try:
    __version__ = _metadata.version("tokred-mamba")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "IMAGENET_EVAL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MTR",
    "Attachment",
    "CheckpointError",
    "ForwardStats",
    "ImageFolder",
    "ImagePlan",
    "LoadedCheckpoint",
    "MambaClassifier",
    "ModelSpec",
    "PreprocessConfig",
    "ToPViMReducer",
    "UTRReducer",
    "UnknownModelError",
    "VideoMamba",
    "VideoMambaImage",
    "VisionMamba",
    "__version__",
    "attach",
    "available_models",
    "count_flops",
    "create_model",
    "load_checkpoint",
    "load_image",
    "model_spec",
    "preprocess_image",
    "register_model",
    "solve_schedule",
]
