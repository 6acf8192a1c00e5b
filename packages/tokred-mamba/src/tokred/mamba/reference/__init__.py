"""The reference model of tokred-mamba: a small trained Vim, its training, and its ``tokred bench`` suite.

Importing this package registers ``vim_scenes`` with :func:`tokred.mamba.create_model`.
"""

from tokred.mamba.reference.model import (
    REFERENCE_MODEL,
    load_reference_card,
    load_reference_vim,
    reference_asset,
    vim_scenes,
)

__all__ = ["REFERENCE_MODEL", "load_reference_card", "load_reference_vim", "reference_asset", "vim_scenes"]
