"""tokred-vlm: token reduction for transformers vision-language models.

``attach(model, reducer)`` makes a LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision (LLaVA-Video) or
Video-LLaVA model run with fewer visual tokens, through its usual ``model(**inputs)`` and
``model.generate(**inputs)``; ``ApET`` is the approximation-error reducer of Ma et al. (CVPR 2026).
"""

from importlib import metadata as _metadata

from tokred.vlm.apet import ApET
from tokred.vlm.attachment import Attachment, GroupPlan, PrefillStats, attach
from tokred.vlm.models import SUPPORTED_MODELS, ModelFamily, supported_model_names

try:
    __version__ = _metadata.version("tokred-vlm")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "SUPPORTED_MODELS",
    "ApET",
    "Attachment",
    "GroupPlan",
    "ModelFamily",
    "PrefillStats",
    "__version__",
    "attach",
    "supported_model_names",
]
