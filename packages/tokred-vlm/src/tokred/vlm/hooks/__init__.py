"""The hooks behind [`attach`][tokred.vlm.attach], one job per module.

* [`encoding`][tokred.vlm.hooks.encoding]: wrappers of ``get_*_features`` / ``pack_image_features`` and the
  projector hook that record how every encoded image or video splits into groups (and reduce in vision space);
  the record travels on the encoder's output.
* [`placeholders`][tokred.vlm.hooks.placeholders]: at the multimodal base model, the call's visual placeholders
  matched with those records.
* [`surgery`][tokred.vlm.hooks.surgery]: at the language model, the reduced prefill and the decode steps after it.
* [`stages`][tokred.vlm.hooks.stages]: inner stages, reducing again inside the language model after layer ``L``.
* [`groups`][tokred.vlm.hooks.groups]: the reducer run on all groups of a call, equal sizes batched.
"""

__all__: list[str] = []
