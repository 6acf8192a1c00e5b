"""The model families tokred.vlm supports, one adapter module each, and the adapter registry.

| family | class | modalities | groups | space by default |
|---|---|---|---|---|
| ``llava`` | ``LlavaForConditionalGeneration`` | image | the image | vision |
| ``llava_next`` | ``LlavaNextForConditionalGeneration`` | image | each anyres crop | vision |
| ``qwen2_vl`` | ``Qwen2VLForConditionalGeneration`` | image, video | the image, each frame | llm |
| ``qwen2_5_vl`` | ``Qwen2_5_VLForConditionalGeneration`` | image, video | the image, each frame | llm |
| ``llava_onevision`` | ``LlavaOnevisionForConditionalGeneration`` | image, video | each crop, each frame | llm |
| ``video_llava`` | ``VideoLlavaForConditionalGeneration`` | image, video | the image, each frame | llm |

Adding a family is one module with a [`ModelAdapter`][tokred.vlm.models.ModelAdapter] subclass and one import
line below (or, from another package, one ``tokred.vlm_adapters`` entry point).
"""

from tokred.vlm.models import llava as llava
from tokred.vlm.models import llava_next as llava_next
from tokred.vlm.models import llava_onevision as llava_onevision
from tokred.vlm.models import qwen2_5_vl as qwen2_5_vl
from tokred.vlm.models import qwen2_vl as qwen2_vl
from tokred.vlm.models import video_llava as video_llava
from tokred.vlm.models.base import (
    ADAPTER_ENTRY_POINT_GROUP,
    ADAPTERS,
    ModelAdapter,
    Positions,
    Space,
    VideoGroups,
    adapter_class_for,
    available_adapters,
    register_adapter,
)

__all__ = [
    "ADAPTERS",
    "ADAPTER_ENTRY_POINT_GROUP",
    "ModelAdapter",
    "Positions",
    "Space",
    "VideoGroups",
    "adapter_class_for",
    "available_adapters",
    "register_adapter",
    "supported_model_names",
]


def supported_model_names() -> list[str]:
    """The transformers class names [`attach`][tokred.vlm.attach] accepts, family by family.

    Returns:
        Class names, in the order of the family names.
    """
    return [name for adapter in available_adapters() for name in adapter.model_classes]
