"""The entry point lmms-eval loads: the manifest of the ``tokred`` model, without importing torch.

lmms-eval reads the ``lmms_eval.models`` entry-point group when it starts and calls
[`manifests`][tokred.vlm.eval.plugin.manifests]; the model classes themselves are imported only when a run asks
for ``--model tokred``.
"""

from __future__ import annotations

from typing import Any

from tokred.vlm.eval import MODEL_ID

__all__ = ["MODEL_CLASS", "manifests"]

MODEL_CLASS = "tokred.vlm.eval.models.Tokred"
"""The dotted path of the model class lmms-eval instantiates for ``--model tokred``."""


def manifests() -> list[Any]:
    """lmms-eval's ``ModelManifest`` of the ``tokred`` chat model.

    Returns:
        A one-element list; the class is [`Tokred`][tokred.vlm.eval.models.Tokred], which dispatches on the
        checkpoint's config to the class of its family.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, chat_class_path=MODEL_CLASS)]
