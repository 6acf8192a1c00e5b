"""Token reducers that belong to vision-language models: ApET.

Importing this package registers ``apet``; the tokred-vlm distribution also declares it in the
``tokred.reducers`` entry-point group, so ``create_reducer("apet")`` works without importing it.
"""

from tokred.vlm.methods.apet import ApET

__all__ = ["ApET"]
