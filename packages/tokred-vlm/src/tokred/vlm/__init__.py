"""tokred-vlm: token reduction for transformers vision-language models.

``attach(model, reducer)`` makes a LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision (LLaVA-Video) or
Video-LLaVA model run with fewer visual tokens, through its usual ``model(**inputs)`` and
``model.generate(**inputs)``; ``ApET`` is the approximation-error reducer of Ma et al. (CVPR 2026). Each model
family is one adapter in [`tokred.vlm.models`][tokred.vlm.models].
"""

from importlib import metadata as _metadata

from tokred.vlm.attachment import Attachment, attach
from tokred.vlm.methods import ApET
from tokred.vlm.models import ModelAdapter, available_adapters, register_adapter, supported_model_names
from tokred.vlm.results import GroupPlan, PrefillStats, StageStats
from tokred.vlm.schedules import paper_schedule

try:
    __version__ = _metadata.version("tokred-vlm")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ApET",
    "Attachment",
    "GroupPlan",
    "ModelAdapter",
    "PrefillStats",
    "StageStats",
    "__version__",
    "attach",
    "available_adapters",
    "paper_schedule",
    "register_adapter",
    "supported_model_names",
]
