"""tokred-mamba: Vision Mamba models in pure PyTorch and MTR token reduction.

Vim, VideoMamba, the selective-scan backends and MTR land here next; this release only establishes the
package.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tokred-mamba")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
