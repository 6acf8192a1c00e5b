"""Token reducers that belong to Vision Mamba: MTR and the closest published training-free baselines.

Importing this package registers ``mtr``, ``topvim`` and ``utr``; the tokred-mamba distribution also declares
them in the ``tokred.reducers`` entry-point group, so ``create_reducer("mtr")`` works without importing it.
"""

from tokred.mamba.methods.mtr import MTR
from tokred.mamba.methods.topvim import ToPViMReducer
from tokred.mamba.methods.utr import UTRReducer

__all__ = ["MTR", "ToPViMReducer", "UTRReducer"]
