"""Named checkpoints: short names that other packages give to model folders, for ``tokred vlm generate --model``.

A distribution that bundles a ``save_pretrained`` folder declares it in the entry-point group
``tokred.vlm_checkpoints`` (``name = "module:function"``, the function returning the folder); tokred-bench
declares its reference LLaVA as ``llava_scenes``. [`resolve_model`][tokred.vlm.checkpoints.resolve_model] turns
such a name into the folder and leaves every other model id (a local folder, a Hub id) as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tokred.core.registry import Registry

__all__ = ["CHECKPOINTS", "CHECKPOINT_ENTRY_POINT_GROUP", "named_checkpoints", "resolve_model"]

CHECKPOINT_ENTRY_POINT_GROUP = "tokred.vlm_checkpoints"
"""Entry-point group of the named checkpoints (``name = "module:function"``, the function returning a folder)."""

CHECKPOINTS: Registry[Callable[[], os.PathLike[str] | str]] = Registry(CHECKPOINT_ENTRY_POINT_GROUP, "named checkpoint")
"""The named-checkpoint registry."""


def named_checkpoints() -> list[str]:
    """The names of every installed named checkpoint."""
    return CHECKPOINTS.names()


def resolve_model(model_id: str) -> str:
    """The folder behind a named checkpoint, or ``model_id`` unchanged (a local folder or a Hub id).

    A name that is also an existing local folder is taken as the folder.

    Args:
        model_id: ``llava_scenes``, ``./my-checkpoint``, ``llava-hf/llava-1.5-7b-hf``, …
    """
    if model_id in CHECKPOINTS and not Path(model_id).exists():
        return str(Path(CHECKPOINTS.get(model_id)()))
    return model_id
