"""tokred-vlm: token reduction for transformers vision-language models.

ApET and the per-model integrations (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, Video-LLaVA)
land here next; this release only establishes the package.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tokred-vlm")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
