"""Processors without torchvision: load a VLM's processor for images when its video processor cannot be built.

transformers builds the video processor of Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision and Video-LLaVA with
torchvision, which tokred-vlm does not depend on; without it ``AutoProcessor.from_pretrained`` fails for those
models even when only images are used. [`load_processor`][tokred.vlm.processors.load_processor] falls back to
[`images_only`][tokred.vlm.processors.images_only].
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from tokred.core.errors import InvalidInputError

__all__ = ["images_only", "load_processor"]


@functools.cache
def images_only(cls: type) -> type:
    """A subclass of processor class ``cls`` that has no video processor (images only).

    transformers builds video processors with torchvision; without it a processor whose class also takes videos
    (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, Video-LLaVA) can be neither built, saved nor loaded. The subclass
    keeps the name and behaviour of ``cls`` for text and images and leaves the video slot empty (None), so it
    builds, saves a folder that ``cls.from_pretrained`` reads back, and loads one without torchvision.

    Args:
        cls: A ``ProcessorMixin`` subclass whose attributes include ``video_processor``.

    Returns:
        The subclass (one per ``cls``), with the same ``__name__`` so that saved folders name ``cls``.
    """
    from transformers.processing_utils import ProcessorMixin

    full = tuple(cls.get_attributes())
    kept = [name for name in full if name != "video_processor"]

    class _NoVideoSlot(ProcessorMixin):
        # Sits between ``cls`` and ProcessorMixin in the MRO: ``cls.__init__`` passes its sub-processors
        # positionally in the order of ``full``; they are named here and the empty video slot is dropped.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            named = dict(zip(full, args, strict=False))
            video = named.pop("video_processor", None)
            if kwargs.pop("video_processor", None) is not None or video is not None:
                raise InvalidInputError(f"this {cls.__name__} is images-only; it takes no video processor")
            super().__init__(**named, **kwargs)

    def get_attributes(klass: type) -> list[str]:
        return list(kept)

    def from_args_and_dict(klass: type, args: Sequence[Any], processor_dict: dict[str, Any], **kwargs: Any) -> Any:
        # ``args`` come in the order of ``kept``; ``cls.__init__`` takes them in the order of ``full``.
        named = dict(zip(kept, args, strict=True))
        ordered = [named.get(name) for name in full]
        return ProcessorMixin.from_args_and_dict.__func__(klass, ordered, processor_dict, **kwargs)

    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": f"{cls.__name__} without a video processor (images only).",
        "video_processor": None,
        "get_attributes": classmethod(get_attributes),
        "from_args_and_dict": classmethod(from_args_and_dict),
    }
    return type(cls.__name__, (cls, _NoVideoSlot), namespace)


def load_processor(model_id: str, *, warn: Callable[[str], None] | None = None, **options: Any) -> Any:
    """``AutoProcessor.from_pretrained(model_id)``, falling back to an images-only processor.

    The fallback is taken when the processor class has a video processor that cannot be loaded: without
    torchvision, or for a folder saved by an images-only processor (no video processor config).

    Args:
        model_id: A local folder written by ``save_pretrained`` or a Hub model id.
        warn: Called with a one-line note when the images-only fallback is used.
        **options: Passed to ``from_pretrained`` (``max_pixels=...``).

    Returns:
        The processor.

    Raises:
        InvalidInputError: If no processor can be loaded; the message carries the original error.
    """
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.utils import is_torchvision_available

    try:
        return AutoProcessor.from_pretrained(model_id, **options)
    except Exception as exc:
        error = exc
    try:
        cls = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(model_id))]
    except Exception:
        cls = None
    if cls is not None and "video_processor" in cls.get_attributes():
        try:
            processor = images_only(cls).from_pretrained(model_id, **options)
        except Exception:
            processor = None
        if processor is not None:
            if warn is not None:
                why = "torchvision is not installed" if not is_torchvision_available() else "it has none"
                warn(f"{why}; loaded {cls.__name__} without its video processor (images work, videos would not)")
            return processor
    raise InvalidInputError(f"cannot load the processor of {model_id}: {type(error).__name__}: {error}")
