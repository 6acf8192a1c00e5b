"""Tiny random-weight VLMs, processor-free inputs and real processors for tests.

Everything here is built from configs alone: no checkpoint, tokenizer or image processor is downloaded. The six
supported model classes are covered, one *family* name each:

| family | class |
| --- | --- |
| ``llava`` | ``LlavaForConditionalGeneration`` |
| ``llava_next`` | ``LlavaNextForConditionalGeneration`` |
| ``qwen2_vl`` | ``Qwen2VLForConditionalGeneration`` |
| ``qwen2_5_vl`` | ``Qwen2_5_VLForConditionalGeneration`` |
| ``llava_onevision`` | ``LlavaOnevisionForConditionalGeneration`` |
| ``video_llava`` | ``VideoLlavaForConditionalGeneration`` |

All models share the same token layout: a vocabulary of 1000 ids, ``PAD, BOS, EOS = 0, 1, 2``, the image
placeholder ``999``, the video placeholder ``998`` and, for Qwen, ``vision_start``/``vision_end`` ``997``/``996``.
Random text tokens are drawn from ``3..899``, so they never collide with a special id. Every decoder has two
layers and hidden size 64; every vision tower has two layers.

A batch is described as *rows* of *items*. An item is an ``int`` (that many random text tokens), an
[`Image`][tokred.vlm.testing.Image] or a [`Video`][tokred.vlm.testing.Video]:

```python
model = tiny_model("llava_next", attn_implementation="sdpa")
inputs = tiny_inputs(model, [[3, Image(40, 60), 4], [2, Image(), 3, Image(), 2]])
out = model(**inputs)                      # logits (2, L, 1000)
model.generate(**inputs, max_new_tokens=3, do_sample=False)
```

[`tiny_inputs`][tokred.vlm.testing.tiny_inputs] returns exactly the keyword arguments the model's own processor would
return (``input_ids``, ``attention_mask`` and the family's pixel and grid tensors), with the right number of placeholder
tokens per item ([`placeholder_count`][tokred.vlm.testing.placeholder_count]).

[`tiny_processor`][tokred.vlm.testing.tiny_processor] builds the family's real transformers processor for these models
(PIL image processor, word-level tokenizer, chat template), for end-to-end runs from image files: it saves and loads
with ``save_pretrained`` / ``from_pretrained`` like a downloaded checkpoint. It takes images only (see its docstring).

Per-item placeholder counts (``S`` = vision ``image_size`` 28, ``p`` = patch size 7, so ``n = (S/p)**2 = 16``):

* ``llava``: ``n`` per image (CLS dropped by ``vision_feature_select_strategy="default"``). Images must be S x S.
* ``llava_next``: anyres. ``n`` (base tile) ``+ h*w + h`` where ``h x w`` is the unpadded feature grid of the best
  ``image_grid_pinpoints`` resolution and ``+ h`` are the per-row ``image_newline`` tokens. Any image size.
* ``llava_onevision``: images as ``llava_next`` plus the ``anyres_max_9`` down-scaling; an image in a row with
  several images is not anyres-tiled and takes ``n + 1`` tokens (base tile + one newline). Videos:
  ``frames * ceil(sqrt(n)/2)**2 + 1``. Video frames must be S x S.
* ``qwen2_vl`` / ``qwen2_5_vl``: ``t*h*w / 4`` with ``h = H/14``, ``w = W/14``, ``t = 1`` for an image and
  ``frames/2`` for a video. ``H`` and ``W`` must be multiples of 28 and video ``frames`` a multiple of 2. Each
  image/video is wrapped in ``vision_start``/``vision_end``.
* ``video_llava``: ``n`` per image (CLS dropped); ``frames * (n + 1)`` per video (the video path keeps each frame's
  CLS token). Images and frames must be S x S. Any number of frames works with these tiny towers (the real
  LanguageBind checkpoints are trained on 8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches, select_best_resolution

from tokred.core.errors import InvalidInputError, InvalidTypeError
from tokred.vlm._tokenizers import word_level_tokenizer

__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "FAMILIES",
    "IMAGE_GRID_PINPOINTS",
    "IMAGE_TOKEN_ID",
    "MODEL_CLASSES",
    "PAD_TOKEN_ID",
    "SAMPLE_ROWS",
    "TEXT_TOKEN_HIGH",
    "TEXT_TOKEN_LOW",
    "VIDEO_TOKEN_ID",
    "VISION_END_TOKEN_ID",
    "VISION_START_TOKEN_ID",
    "VOCAB_SIZE",
    "Image",
    "Item",
    "Video",
    "family_of",
    "placeholder_count",
    "placeholder_counts",
    "tiny_config",
    "tiny_inputs",
    "tiny_model",
    "tiny_processor",
    "word_level_tokenizer",
]

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision", "video_llava")
"""The supported family names, one per model class (see [`MODEL_CLASSES`][tokred.vlm.testing.MODEL_CLASSES])."""

MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "video_llava": VideoLlavaForConditionalGeneration,
}
"""Family name -> ``*ForConditionalGeneration`` class built by [`tiny_model`][tokred.vlm.testing.tiny_model]."""

VOCAB_SIZE = 1000
"""Vocabulary size of every tiny decoder (and so the last dimension of the logits)."""
PAD_TOKEN_ID = 0
"""Padding id; padded positions have ``attention_mask == 0``."""
BOS_TOKEN_ID = 1
"""Beginning-of-sequence id; every row produced by [`tiny_inputs`][tokred.vlm.testing.tiny_inputs] starts with it."""
EOS_TOKEN_ID = 2
"""End-of-sequence id (``generate`` may stop on it)."""
IMAGE_TOKEN_ID = 999
"""Image placeholder id (``config.image_token_id``)."""
VIDEO_TOKEN_ID = 998
"""Video placeholder id (``config.video_token_id``); unused by ``llava`` and ``llava_next``."""
VISION_START_TOKEN_ID = 997
"""Qwen ``<|vision_start|>`` id, written before each image/video placeholder run."""
VISION_END_TOKEN_ID = 996
"""Qwen ``<|vision_end|>`` id, written after each image/video placeholder run."""
TEXT_TOKEN_LOW = 3
"""Smallest id of a random text token (inclusive)."""
TEXT_TOKEN_HIGH = 899
"""Largest id of a random text token (inclusive)."""

IMAGE_GRID_PINPOINTS: list[list[int]] = [[28, 56], [56, 28], [56, 56]]
"""Anyres resolutions (H, W) of the tiny ``llava_next`` and ``llava_onevision`` models (multiples of 28)."""

_VISION_IMAGE_SIZE = 28
_VISION_PATCH = 7
_QWEN_PATCH = 14
_QWEN_MERGE = 2
_QWEN_TEMPORAL = 2
_QWEN25_SECOND_PER_GRID = 1.0  # temporal_patch_size / fps with the processor's default fps of 2


@dataclass(frozen=True)
class Image:
    """An image item: an image of ``height`` x ``width`` pixels.

    Pixels are random (seeded); only the size matters. ``llava`` and ``video_llava`` need 28 x 28 (their vision
    tower has fixed position embeddings); ``llava_next`` and ``llava_onevision`` take any size (anyres, the size
    goes to ``image_sizes``); Qwen needs multiples of 28.

    Attributes:
        height: Image height in pixels.
        width: Image width in pixels.
    """

    height: int = 28
    width: int = 28

    def __post_init__(self) -> None:
        _check_positive(self, "height", "width")


@dataclass(frozen=True)
class Video:
    """A video item: ``frames`` frames of ``height`` x ``width`` pixels.

    Valid for ``qwen2_vl``, ``qwen2_5_vl``, ``llava_onevision`` and ``video_llava``. Qwen needs ``frames`` to be a
    multiple of 2 (the temporal patch) and sizes that are multiples of 28; the other two need 28 x 28 frames and all
    videos of one batch must have the same number of frames (the processor stacks them into one tensor).

    Attributes:
        frames: Number of frames.
        height: Frame height in pixels.
        width: Frame width in pixels.
    """

    frames: int = 2
    height: int = 28
    width: int = 28

    def __post_init__(self) -> None:
        _check_positive(self, "frames", "height", "width")


Item = int | Image | Video
"""One element of a row: a number of random text tokens, an [`Image`][tokred.vlm.testing.Image] or a
[`Video`][tokred.vlm.testing.Video]."""


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


SAMPLE_ROWS: dict[str, list[list[Item]]] = {
    "llava": [[3, Image(), 4], [2, Image(), 3, Image(), 2]],
    "llava_next": [[3, Image(28, 56), 4], [2, Image(56, 56), 2, Image(56, 28), 2]],
    "qwen2_vl": [[3, Image(56, 84), 4], [2, Image(56, 56), 3, Video(4, 56, 56), 2]],
    "qwen2_5_vl": [[3, Image(56, 84), 4], [2, Image(56, 56), 3, Video(4, 56, 56), 2]],
    "llava_onevision": [[3, Image(56, 56), 4], [2, Video(2), 2]],
    "video_llava": [[3, Image(), 4], [2, Video(2), 2]],
}
"""A batch of two rows for every family, for [`tiny_inputs`][tokred.vlm.testing.tiny_inputs]: a different number
of images per row (so the batch is padded), videos where the family takes them, every row ending in text.
Anyres images have sizes equal to the tiny models' grid pinpoints, so their crops tile the grid regularly."""


def _check_family(family: str) -> str:
    if family not in MODEL_CLASSES:
        raise InvalidInputError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return family


# -- configs and models ----------------------------------------------------------------------------------------


def _clip_vision() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_VISION_IMAGE_SIZE,
        patch_size=_VISION_PATCH,
        projection_dim=32,
    )


# Shared by the Llama and Qwen decoders: 2 layers, hidden 64, the module's special ids.
_TEXT_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
}


def _llama_text() -> LlamaConfig:
    return LlamaConfig(**_TEXT_COMMON, max_position_embeddings=512)


def _qwen_text() -> dict:
    return {
        **_TEXT_COMMON,
        "max_position_embeddings": 1024,
        # sum(mrope_section) must be head_dim // 2 = (64 / 4) / 2 = 8
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }


def tiny_config(family: str) -> PreTrainedConfig:
    """Build the tiny config of one family (a fresh object on every call).

    Args:
        family: One of [`FAMILIES`][tokred.vlm.testing.FAMILIES].

    Returns:
        The composite config (vision tower with 2 layers, decoder with 2 layers and hidden size 64, vocabulary
        1000, special ids as in the module constants).

    Raises:
        ValueError: If ``family`` is unknown.
    """
    _check_family(family)
    if family == "llava":
        return LlavaConfig(
            vision_config=_clip_vision(),
            text_config=_llama_text(),
            image_token_index=IMAGE_TOKEN_ID,
            image_seq_length=(_VISION_IMAGE_SIZE // _VISION_PATCH) ** 2,
            vision_feature_layer=-2,  # needs >= 2 vision layers
            vision_feature_select_strategy="default",
        )
    if family == "llava_next":
        return LlavaNextConfig(
            vision_config=_clip_vision(),
            text_config=_llama_text(),
            image_token_index=IMAGE_TOKEN_ID,
            image_grid_pinpoints=[list(p) for p in IMAGE_GRID_PINPOINTS],
            image_seq_length=(_VISION_IMAGE_SIZE // _VISION_PATCH) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    if family == "llava_onevision":
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=_VISION_IMAGE_SIZE,
                patch_size=_VISION_PATCH,
                vision_use_head=False,
            ),
            text_config=Qwen2Config(**{k: v for k, v in _qwen_text().items() if k != "rope_parameters"}),
            image_token_index=IMAGE_TOKEN_ID,
            video_token_index=VIDEO_TOKEN_ID,
            image_grid_pinpoints=[list(p) for p in IMAGE_GRID_PINPOINTS],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    if family == "video_llava":
        per_frame = (_VISION_IMAGE_SIZE // _VISION_PATCH) ** 2 + 1  # the video path keeps CLS
        return VideoLlavaConfig(
            vision_config=_clip_vision(),
            text_config=_llama_text(),
            image_token_index=IMAGE_TOKEN_ID,
            video_token_index=VIDEO_TOKEN_ID,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            # Processor metadata only (the model never reads them): tokens per image and per 2-frame video.
            image_seq_length=per_frame - 1,
            video_seq_length=2 * per_frame,
        )
    common = {
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_TOKEN_ID,
        "vision_end_token_id": VISION_END_TOKEN_ID,
        "text_config": _qwen_text(),
    }
    if family == "qwen2_vl":
        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,  # merger output = decoder hidden size
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": _QWEN_PATCH,
            "spatial_merge_size": _QWEN_MERGE,
            "temporal_patch_size": _QWEN_TEMPORAL,
            "in_channels": 3,
        }
        return Qwen2VLConfig(vision_config=vision, **common)
    vision = {  # qwen2_5_vl: different field names from Qwen2-VL
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,  # merger output = decoder hidden size
        "num_heads": 4,
        "patch_size": _QWEN_PATCH,
        "spatial_merge_size": _QWEN_MERGE,
        "temporal_patch_size": _QWEN_TEMPORAL,
        "in_channels": 3,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(vision_config=vision, **common)


def tiny_model(
    family: str,
    *,
    attn_implementation: str = "eager",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    decoder_layers: int = 2,
) -> PreTrainedModel:
    """Build a tiny random-weight VLM of one family, in ``eval()`` mode.

    The weights depend only on ``seed`` (the global RNG is forked, so the caller's random state is left alone).
    The generation config gets ``pad/bos/eos`` ids ``0/1/2``.

    Args:
        family: One of [`FAMILIES`][tokred.vlm.testing.FAMILIES].
        attn_implementation: ``"eager"``, ``"sdpa"`` or any other implementation transformers accepts; it is
            applied to the decoder and the vision tower.
        seed: Seed of the weight initialisation.
        dtype: Parameter dtype.
        decoder_layers: Layers of the language decoder (room for inner stages: ``attach(..., layers=...)``).

    Returns:
        A ``*ForConditionalGeneration`` model (see [`MODEL_CLASSES`][tokred.vlm.testing.MODEL_CLASSES]).

    Raises:
        ValueError: If ``family`` is unknown.
    """
    cls = MODEL_CLASSES[_check_family(family)]
    config = tiny_config(family)
    if decoder_layers < 1:
        raise ValueError(f"decoder_layers must be at least 1, got {decoder_layers}")
    config.text_config.num_hidden_layers = decoder_layers
    if getattr(config.text_config, "layer_types", None):
        config.text_config.layer_types = [config.text_config.layer_types[0]] * decoder_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.bos_token_id = BOS_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    return model.eval()


def family_of(model: PreTrainedModel) -> str:
    """Return the family name of a model built from one of the supported classes.

    Args:
        model: A model whose class is (a subclass of) one of [`MODEL_CLASSES`][tokred.vlm.testing.MODEL_CLASSES].

    Returns:
        The family name.

    Raises:
        InvalidTypeError: If the model's class is not supported.
    """
    for family, cls in MODEL_CLASSES.items():
        if isinstance(model, cls):
            return family
    raise InvalidTypeError(f"unsupported model class {type(model).__name__}; expected one of {FAMILIES}")


# -- placeholder counts ----------------------------------------------------------------------------------------


def _tile_side(config: PreTrainedConfig) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


def _has_cls(vision_config: PreTrainedConfig) -> bool:
    return vision_config.model_type.startswith("clip")


def _tile_tokens(config: PreTrainedConfig) -> int:
    """Tokens of one S x S tile after ``vision_feature_select_strategy``."""
    n = _tile_side(config) ** 2
    if _has_cls(config.vision_config) and config.vision_feature_select_strategy != "default":
        n += 1
    return n


def _anyres_tokens(config: PreTrainedConfig, height: int, width: int, max_patches: int | None) -> int:
    """Tokens of an anyres image, mirroring ``pack_image_features`` (LLaVA-NeXT, LLaVA-OneVision)."""
    side = _tile_side(config)
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    cur_h = best_h // config.vision_config.image_size * side
    cur_w = best_w // config.vision_config.image_size * side
    # unpad_image
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    if max_patches is not None:  # OneVision "anyres_max_N" bilinear down-scaling
        ratio = math.sqrt(cur_h * cur_w / (max_patches * side**2))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return _tile_tokens(config) + cur_h * cur_w + cur_h  # base tile + grid + one newline per row


def _check_item(family: str, config: PreTrainedConfig, item: Image | Video) -> None:
    if isinstance(item, Video) and family in ("llava", "llava_next"):
        raise InvalidInputError(f"family {family!r} has no video input; Video items need one of {_video_families()}")
    if family in ("qwen2_vl", "qwen2_5_vl"):
        vc = config.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        if item.height % unit or item.width % unit:
            raise InvalidInputError(
                f"{family}: height and width must be multiples of {unit} (patch x merge), got {item}"
            )
        if isinstance(item, Video) and item.frames % vc.temporal_patch_size:
            raise InvalidInputError(
                f"{family}: video frames must be a multiple of {vc.temporal_patch_size}, got {item}"
            )
        return
    size = config.vision_config.image_size
    fixed = family in ("llava", "video_llava") or isinstance(item, Video)
    if fixed and (item.height != size or item.width != size):
        what = "video frames" if isinstance(item, Video) else "images"
        raise InvalidInputError(f"{family}: {what} must be {size} x {size} (the vision image_size), got {item}")


def _video_families() -> tuple[str, ...]:
    return tuple(f for f in FAMILIES if f not in ("llava", "llava_next"))


def placeholder_count(model: PreTrainedModel, item: Image | Video, *, multi_image: bool = False) -> int:
    """Number of placeholder tokens the model expects for one image or video.

    Computed from the config with the model's own formulas (see the module docstring); equal to the length of the
    item's entry in ``model.model.get_image_features(...).pooler_output`` (or ``get_video_features``).

    Args:
        model: A model of one of the supported families (only its class and config are read).
        item: The image or video.
        multi_image: Only for ``llava_onevision`` images: whether the image sits in a row with more than one image
            (then it is not anyres-tiled, exactly as the processor and ``batch_num_images`` do).

    Returns:
        The number of ``image_token_id`` (or ``video_token_id``) tokens for the item, not counting Qwen's
        ``vision_start``/``vision_end``.

    Raises:
        ValueError: If the item is not valid for the family (size, frames, video support).
        TypeError: If ``item`` is not an [`Image`][tokred.vlm.testing.Image] or [`Video`][tokred.vlm.testing.Video].
    """
    family = family_of(model)
    config = model.config
    if not isinstance(item, (Image, Video)):
        raise InvalidTypeError(f"item must be an Image or a Video, got {item!r}")
    _check_item(family, config, item)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        vc = config.vision_config
        t = item.frames // vc.temporal_patch_size if isinstance(item, Video) else 1
        return t * (item.height // vc.patch_size) * (item.width // vc.patch_size) // vc.spatial_merge_size**2
    if family == "llava_onevision":
        if isinstance(item, Video):
            return item.frames * math.ceil(_tile_side(config) / 2) ** 2 + 1
        if multi_image:
            return _tile_tokens(config) + 1
        return _anyres_tokens(
            config, item.height, item.width, int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        )
    if family == "llava_next":
        return _anyres_tokens(config, item.height, item.width, None)
    if family == "video_llava" and isinstance(item, Video):
        return item.frames * (_tile_side(config) ** 2 + int(_has_cls(config.vision_config)))
    return _tile_tokens(config)  # llava / video_llava image


def placeholder_counts(model: PreTrainedModel, rows: Sequence[Sequence[Item]]) -> list[list[int]]:
    """Placeholder counts of every image/video of a batch, in row order.

    As [`tiny_inputs`][tokred.vlm.testing.tiny_inputs] writes them.

    Args:
        model: A model of one of the supported families.
        rows: The batch description passed to [`tiny_inputs`][tokred.vlm.testing.tiny_inputs].

    Returns:
        One list per row with one count per [`Image`][tokred.vlm.testing.Image]/[`Video`][tokred.vlm.testing.Video] of
        the row (text items are skipped).
    """
    rows = _check_rows(rows)
    out = []
    for row in rows:
        multi = sum(isinstance(it, Image) for it in row) > 1
        out.append([placeholder_count(model, it, multi_image=multi) for it in row if not isinstance(it, int)])
    return out


# -- inputs ----------------------------------------------------------------------------------------------------


def _check_rows(rows: Sequence[Sequence[Item]]) -> list[list[Item]]:
    if isinstance(rows, (Image, Video, int)) or not len(rows):
        raise InvalidInputError("rows must be a non-empty list of rows (lists of items)")
    out = []
    for row in rows:
        if isinstance(row, (Image, Video, int)):
            raise InvalidInputError(f"each row must be a list of items, got {row!r}; wrap a single row as [[...]]")
        for it in row:
            if isinstance(it, bool) or not isinstance(it, (int, Image, Video)):
                raise InvalidTypeError(f"an item must be an int, Image or Video, got {it!r}")
            if isinstance(it, int) and it < 0:
                raise InvalidInputError(f"a text item must be >= 0 tokens, got {it}")
        out.append(list(row))
    return out


def tiny_inputs(
    model: PreTrainedModel, rows: Sequence[Sequence[Item]], *, padding_side: str = "left", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Build processor-free model inputs for a batch of rows.

    Each row becomes ``BOS`` followed by its items: an ``int`` ``n`` gives ``n`` random text tokens from
    ``TEXT_TOKEN_LOW..TEXT_TOKEN_HIGH``, an image/video gives
    [`placeholder_count`][tokred.vlm.testing.placeholder_count] placeholder tokens (wrapped in
    ``vision_start``/``vision_end`` for Qwen). Rows are padded with ``PAD_TOKEN_ID`` on ``padding_side``.

    The returned keys are those of the family's processor:

    * all: ``input_ids`` ``(B, L)`` long, ``attention_mask`` ``(B, L)`` long.
    * ``llava``: ``pixel_values`` ``(N, 3, 28, 28)``.
    * ``llava_next``: ``pixel_values`` ``(N, max_patches, 3, 28, 28)`` (zero-padded tiles),
      ``image_sizes`` ``(N, 2)`` long, the original ``(H, W)``.
    * ``llava_onevision``: as ``llava_next`` (an image in a row with several images gets a single tile) plus
      ``batch_num_images`` long, the number of images of each row that has any (rows without images are left out,
      as in the processor); videos: ``pixel_values_videos`` ``(V, frames, 3, 28, 28)``.
    * ``qwen2_vl`` / ``qwen2_5_vl``: ``pixel_values`` ``(sum t*h*w, 1176)``, ``image_grid_thw`` ``(N, 3)``;
      ``pixel_values_videos``, ``video_grid_thw`` ``(V, 3)``; ``mm_token_type_ids`` ``(B, L)`` (0 text/pad,
      1 image, 2 video) always; ``qwen2_5_vl`` videos also ``second_per_grid_ts`` ``(V,)`` float.
    * ``video_llava``: ``pixel_values`` ``(N, 3, 28, 28)``, ``pixel_values_videos`` ``(V, frames, 3, 28, 28)``.

    Image/video keys appear only when the batch has images/videos. Pixel values are seeded standard normal
    noise in the model's dtype, on the model's device; images and videos are ordered row-major, as the model
    scatters features.

    Args:
        model: A model of one of the supported families (e.g. from [`tiny_model`][tokred.vlm.testing.tiny_model]).
        rows: A list (batch) of lists of items (``int``, [`Image`][tokred.vlm.testing.Image] or
            [`Video`][tokred.vlm.testing.Video]).
        padding_side: ``"left"`` or ``"right"``.
        seed: Seed of the text tokens and the pixel values.

    Returns:
        Keyword arguments for ``model(**inputs)`` and ``model.generate(**inputs)``.

    Raises:
        ValueError: On an unknown padding side, an empty batch, or an item the family does not accept.
    """
    if padding_side not in ("left", "right"):
        raise InvalidInputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    family = family_of(model)
    config = model.config
    rows = _check_rows(rows)
    counts = placeholder_counts(model, rows)  # validates every visual item
    qwen = family in ("qwen2_vl", "qwen2_5_vl")
    image_id = config.image_token_id
    video_id = config.video_token_id if family in _video_families() else None
    video_frames = {v.frames for row in rows for v in row if isinstance(v, Video)}
    if not qwen and len(video_frames) > 1:
        raise InvalidInputError(
            f"{family}: all videos of a batch must have the same number of frames, got {video_frames}"
        )
    gen = torch.Generator().manual_seed(seed)
    dtype, device = model.dtype, model.device

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    sequences: list[list[int]] = []
    images: list[tuple[Image, bool]] = []
    videos: list[Video] = []
    for row, row_counts in zip(rows, counts, strict=True):
        seq = [BOS_TOKEN_ID]
        visual = iter(row_counts)
        # LLaVA-OneVision does not anyres-tile the images of a row with several images.
        multi = family == "llava_onevision" and sum(isinstance(it, Image) for it in row) > 1
        for it in row:
            if isinstance(it, int):
                seq += torch.randint(TEXT_TOKEN_LOW, TEXT_TOKEN_HIGH + 1, (it,), generator=gen).tolist()
                continue
            token = image_id if isinstance(it, Image) else video_id
            run = [token] * next(visual)
            seq += [config.vision_start_token_id, *run, config.vision_end_token_id] if qwen else run
            if isinstance(it, Image):
                images.append((it, multi))
            else:
                videos.append(it)
        sequences.append(seq)

    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for b, seq in enumerate(sequences):
        span = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
        input_ids[b, span] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, span] = 1
    out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}

    if qwen:
        vc = config.vision_config
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        if images:
            grids = [(1, im.height // vc.patch_size, im.width // vc.patch_size) for im, _ in images]
            out["pixel_values"] = noise(sum(math.prod(g) for g in grids), dim)
            out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        if videos:
            grids = [
                (v.frames // vc.temporal_patch_size, v.height // vc.patch_size, v.width // vc.patch_size)
                for v in videos
            ]
            out["pixel_values_videos"] = noise(sum(math.prod(g) for g in grids), dim)
            out["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            if family == "qwen2_5_vl":
                out["second_per_grid_ts"] = torch.full((len(videos),), _QWEN25_SECOND_PER_GRID)
        types = torch.zeros_like(input_ids)
        types[input_ids == image_id] = 1
        types[input_ids == video_id] = 2
        out["mm_token_type_ids"] = types
    else:
        size = config.vision_config.image_size
        if images:
            if family in ("llava_next", "llava_onevision"):
                patches = [
                    1 if multi else image_size_to_num_patches((im.height, im.width), config.image_grid_pinpoints, size)
                    for im, multi in images
                ]
                pixels = torch.zeros(len(images), max(patches), 3, size, size, dtype=dtype, device=device)
                for i, n in enumerate(patches):
                    pixels[i, :n] = noise(n, 3, size, size)
                out["pixel_values"] = pixels
                out["image_sizes"] = torch.tensor([(im.height, im.width) for im, _ in images], dtype=torch.long)
                if family == "llava_onevision":
                    # Images per row, rows without images left out (as the processor's nested image list does).
                    per_row = [sum(isinstance(it, Image) for it in row) for row in rows]
                    out["batch_num_images"] = torch.tensor([n for n in per_row if n], dtype=torch.long)
            else:
                out["pixel_values"] = noise(len(images), 3, size, size)
        if videos:
            out["pixel_values_videos"] = noise(len(videos), videos[0].frames, 3, size, size)
    return {k: (v.to(device) if v.device != device else v) for k, v in out.items()}


# -- processors ------------------------------------------------------------------------------------------------

_UNK_TOKEN_ID = 995
_COMMON_TEXT = (
    ". , ? ! : ; ' \" - ( ) user assistant system a an the this that these those there here is are was were be "
    "it its of in on at to from with and or but not no yes what which who where when why how many much do does "
    "can you your i me my we see look describe explain tell about image images picture photo video frame scene "
    "object objects show shows color colour red green blue black white yellow orange gray small large big left "
    "right top bottom middle center one two three four five some all person people man woman child dog cat car "
    "tree sky water grass road house table text detail details briefly please answer question word words short "
    "long caption main"
)
_COMMON_WORDS = _COMMON_TEXT.split()
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

# One template for every family: "user: <image> ... prompt\nassistant:". IMAGE and VIDEO are replaced by the
# family's placeholder strings.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] }}:"
    "{%- if message['content'] is string %} {{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' %} IMAGE"
    "{%- elif part['type'] == 'video' %} VIDEO"
    "{%- elif part['type'] == 'text' %} {{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}assistant:{% endif -%}"
)


def _words() -> list[str]:
    """Words for the ids ``3..994``: common English words, then two-syllable pseudo-words (``bada``, ``bade``, …)."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words = list(dict.fromkeys(_COMMON_WORDS))
    seen = set(words)
    for first in syllables:
        for second in syllables:
            if len(words) == _UNK_TOKEN_ID - TEXT_TOKEN_LOW:
                return words
            if first + second not in seen:
                words.append(first + second)
    raise AssertionError("not enough pseudo-words")  # pragma: no cover - 70 * 70 syllable pairs


def _tiny_tokenizer(image_token: str, video_token: str) -> Any:
    special = {
        PAD_TOKEN_ID: "<pad>",
        BOS_TOKEN_ID: "<s>",
        EOS_TOKEN_ID: "</s>",
        _UNK_TOKEN_ID: "<unk>",
        VISION_END_TOKEN_ID: "<|vision_end|>",
        VISION_START_TOKEN_ID: "<|vision_start|>",
        VIDEO_TOKEN_ID: video_token,
        IMAGE_TOKEN_ID: image_token,
    }
    vocab = {word: TEXT_TOKEN_LOW + i for i, word in enumerate(_words())}
    vocab.update({token: i for i, token in special.items()})
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    extra = [special[i] for i in range(VISION_END_TOKEN_ID, VOCAB_SIZE)]
    return word_level_tokenizer(vocab, BOS_TOKEN_ID, extra)


def tiny_processor(family: str) -> Any:
    """Build the real transformers processor of one family for the tiny models, offline.

    The models are those of [`tiny_model`][tokred.vlm.testing.tiny_model].

    It is the family's own processor class (``LlavaProcessor``, ``Qwen2VLProcessor``, …) with a PIL image processor
    sized for the tiny vision towers (28-pixel tiles, the
    [`IMAGE_GRID_PINPOINTS`][tokred.vlm.testing.IMAGE_GRID_PINPOINTS]; Qwen images scaled to at most 224 x 224 pixels),
    a word-level tokenizer and a chat template, so that:

    ```python
    processor = tiny_processor("llava")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[[pil_image]], return_tensors="pt")
    tiny_model("llava").generate(**inputs, max_new_tokens=5)
    ```

    works with any image size (the rendered prompt is ``"user: <image> describe"``, a newline, ``"assistant:"``),
    and ``save_pretrained`` writes a folder that ``AutoProcessor.from_pretrained`` reads back; next to the model's
    ``save_pretrained`` files it looks like a downloaded checkpoint.

    The tokenizer has the ids of the tiny models (``PAD, BOS, EOS = 0, 1, 2``, image ``999``, video ``998``, Qwen's
    ``vision_start``/``vision_end`` ``997``/``996``, ``<unk>`` ``995``) and a word for every other id: about 130
    common English words and punctuation marks, then pronounceable pseudo-words (``bada``, ``bade``, …), so every
    generated id decodes to a word. Text is lower-cased and split into words and punctuation; unknown words become
    ``<unk>``. It adds ``BOS`` in front and pads on the left. Placeholders are ``<image>``/``<video>``, and
    ``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen.

    Images only: transformers builds video processors with torchvision, which tokred does not depend on. The
    processors of Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision and Video-LLaVA are therefore built without their video
    processor: a subclass with the family class's name whose video slot is None, saved as the family's class.
    Without torchvision, ``AutoProcessor.from_pretrained`` cannot load such a folder (it always builds the video
    processor) and ``tokred vlm generate`` falls back to the same images-only class; with torchvision (untested
    here) it loads the full class, whose video processor then has transformers' defaults, sized for the real
    checkpoints rather than the tiny models. ``llava`` and ``llava_next`` take images only anyway.

    Args:
        family: One of [`FAMILIES`][tokred.vlm.testing.FAMILIES].

    Returns:
        A ``transformers.ProcessorMixin``.

    Raises:
        ValueError: If ``family`` is unknown.
    """
    import transformers

    from tokred.vlm.processors import images_only

    _check_family(family)
    tile = {"height": _VISION_IMAGE_SIZE, "width": _VISION_IMAGE_SIZE}
    pinpoints = {"image_grid_pinpoints": [list(p) for p in IMAGE_GRID_PINPOINTS]}
    clip = {"patch_size": _VISION_PATCH, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    qwen = family in ("qwen2_vl", "qwen2_5_vl")
    image_token, video_token = ("<|image_pad|>", "<|video_pad|>") if qwen else ("<image>", "<video>")
    placeholder = f"<|vision_start|>{image_token}<|vision_end|>" if qwen else image_token
    video = f"<|vision_start|>{video_token}<|vision_end|>" if qwen else video_token
    common = {
        "tokenizer": _tiny_tokenizer(image_token, video_token),
        "chat_template": _CHAT_TEMPLATE.replace("IMAGE", placeholder).replace("VIDEO", video),
    }
    shortest = {"shortest_edge": _VISION_IMAGE_SIZE}
    if family == "llava":
        image_processor = transformers.LlavaImageProcessorPil(size=shortest, crop_size=tile)
        return transformers.LlavaProcessor(image_processor=image_processor, **clip, **common)
    if family == "llava_next":
        image_processor = transformers.LlavaNextImageProcessorPil(size=shortest, crop_size=tile, **pinpoints)
        return transformers.LlavaNextProcessor(image_processor=image_processor, **clip, **common)
    if family == "llava_onevision":
        image_processor = transformers.LlavaOnevisionImageProcessorPil(size=tile, **pinpoints)
        cls = images_only(transformers.LlavaOnevisionProcessor)
        return cls(
            image_processor=image_processor,
            num_image_tokens=_tile_side(tiny_config(family)) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            **common,
        )
    if family == "video_llava":
        image_processor = transformers.VideoLlavaImageProcessor(size=shortest, crop_size=tile)
        cls = images_only(transformers.VideoLlavaProcessor)
        return cls(image_processor=image_processor, **clip, **common)
    image_processor = transformers.Qwen2VLImageProcessorPil(
        min_pixels=_QWEN_PATCH * _QWEN_MERGE * _QWEN_PATCH * _QWEN_MERGE,
        max_pixels=224 * 224,
        patch_size=_QWEN_PATCH,
        merge_size=_QWEN_MERGE,
        temporal_patch_size=_QWEN_TEMPORAL,
    )
    processor_class = transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
    return images_only(processor_class)(image_processor=image_processor, **common)
