"""tokred.vlm.testing: tiny random VLMs and processor-free inputs for the six supported classes."""

import inspect

import numpy as np
import pytest
import torch

from tokred.vlm.testing import (
    BOS_TOKEN_ID,
    FAMILIES,
    IMAGE_TOKEN_ID,
    MODEL_CLASSES,
    PAD_TOKEN_ID,
    TEXT_TOKEN_HIGH,
    TEXT_TOKEN_LOW,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    VOCAB_SIZE,
    Image,
    Video,
    family_of,
    placeholder_count,
    placeholder_counts,
    tiny_config,
    tiny_inputs,
    tiny_model,
    tiny_processor,
)

QWEN = ("qwen2_vl", "qwen2_5_vl")
TWO_ROWS = [[3, Image(), 4], [2, Image(), 3, Image(), 2]]

# (family, rows): single image, a left-padded batch with different image counts, anyres sizes, videos, mixed rows.
CASES = [
    ("llava", [[3, Image(), 4]]),
    ("llava", TWO_ROWS),
    ("llava", [[5], [2, Image()]]),
    ("llava_next", [[3, Image(), 4]]),
    ("llava_next", TWO_ROWS),
    ("llava_next", [[3, Image(40, 60), 4], [2, Image(60, 40), 3, Image(100, 30), 2]]),
    ("llava_onevision", [[3, Image(40, 60), 4]]),
    ("llava_onevision", TWO_ROWS),
    ("llava_onevision", [[3, Image(60, 40)], [4], [1, Image(40, 60), 2, Image(33, 77)]]),
    ("llava_onevision", [[2, Video(3), 2]]),
    ("llava_onevision", [[2, Video(2), 1, Image(40, 60), 2], [1, Image(), Video(2), Image(56, 28)]]),
    ("qwen2_vl", [[3, Image(), 4]]),
    ("qwen2_vl", TWO_ROWS),
    ("qwen2_vl", [[3, Image(56, 84), 4], [2, Image(84, 56), 1]]),
    ("qwen2_vl", [[2, Video(4, 56, 56), 2]]),
    ("qwen2_vl", [[2, Video(2), 1, Image(56, 84)], [1, Image(), 3, Video(4, 56, 28), Image(), 1]]),
    ("qwen2_5_vl", [[3, Image(56, 84), 4]]),
    ("qwen2_5_vl", TWO_ROWS),
    ("qwen2_5_vl", [[2, Video(2, 56, 56), 2], [1, Image(), Video(4), 2]]),
    ("video_llava", [[3, Image(), 4]]),
    ("video_llava", TWO_ROWS),
    ("video_llava", [[2, Video(2), 2]]),
    ("video_llava", [[2, Video(3), 1, Image()], [Image(), 1, Video(3), Video(3)]]),
]
CASE_IDS = [f"{family}-{i}" for i, (family, _) in enumerate(CASES)]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family, attn="eager"):
        if (family, attn) not in cache:
            cache[family, attn] = tiny_model(family, attn_implementation=attn)
        return cache[family, attn]

    return get


def visual_items(rows, kind):
    return [it for row in rows for it in row if isinstance(it, kind)]


def feature_lengths(model, inputs, modality, num_items):
    """Per-item feature lengths from the model's own encoder, called with the kwargs generate() would pass."""
    fn = getattr(model.model, f"get_{modality}_features")
    kwargs = {k: v for k, v in inputs.items() if k in inspect.signature(fn).parameters}
    with torch.no_grad():
        pooled = fn(**kwargs, return_dict=True).pooler_output
    if isinstance(pooled, torch.Tensor):  # (items, n, D); Video-LLaVA videos come as (items * frames, n, D)
        return [len(p) for p in pooled.reshape(num_items, -1, pooled.shape[-1])]
    return [len(p) for p in pooled]


# -- models ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_builds_the_class_in_eval_mode_with_the_attention(family, attn):
    model = tiny_model(family, attn_implementation=attn)
    assert type(model) is MODEL_CLASSES[family]
    assert family_of(model) == family
    assert not model.training
    assert model.config.text_config._attn_implementation == attn
    assert model.config.vision_config._attn_implementation == attn
    text = model.config.text_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers) == (VOCAB_SIZE, 64, 2)
    assert model.config.image_token_id == IMAGE_TOKEN_ID
    if family not in ("llava", "llava_next"):
        assert model.config.video_token_id == VIDEO_TOKEN_ID
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.generation_config.pad_token_id == PAD_TOKEN_ID


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_tiny_model_weights_depend_on_the_seed_only_and_leave_the_global_rng_alone(family):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_model(family, seed=0), tiny_model(family, seed=0), tiny_model(family, seed=1)
    assert torch.equal(torch.rand(3), before)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_models_get_bfloat16_pixels(family):
    model = tiny_model(family, dtype=torch.bfloat16, attn_implementation="sdpa")
    assert model.dtype == torch.bfloat16
    rows = [[2, Image(), 1, Video(2)]] if family not in ("llava", "llava_next") else [[2, Image(), 1]]
    inputs = tiny_inputs(model, rows)
    assert inputs["pixel_values"].dtype == torch.bfloat16
    for key, value in inputs.items():
        if key.startswith("pixel_values"):
            assert value.dtype == torch.bfloat16, key
        elif key != "second_per_grid_ts":
            assert value.dtype == torch.long, key
    with torch.no_grad():
        assert model(**inputs).logits.dtype == torch.bfloat16


# -- forward, generate and placeholder counts ------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(("family", "rows"), CASES, ids=CASE_IDS)
def test_inputs_run_forward_and_generate(models, family, rows, attn):
    model = models(family, attn)
    inputs = tiny_inputs(model, rows)
    batch, length = inputs["input_ids"].shape
    assert batch == len(rows)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (batch, length, VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    assert length < out.shape[1] <= length + 3
    assert torch.equal(out[:, :length], inputs["input_ids"])


@pytest.mark.parametrize(("family", "rows"), CASES, ids=CASE_IDS)
def test_placeholder_counts_equal_the_model_feature_lengths(models, family, rows):
    model = models(family)
    inputs = tiny_inputs(model, rows)
    counted = [
        list(zip(visual_items([row], (Image, Video)), c, strict=True))
        for row, c in zip(rows, placeholder_counts(model, rows), strict=True)
    ]
    for modality, kind, token in (("image", Image, IMAGE_TOKEN_ID), ("video", Video, VIDEO_TOKEN_ID)):
        expected = [c for row in counted for it, c in row if isinstance(it, kind)]
        per_row = [sum(c for it, c in row if isinstance(it, kind)) for row in counted]
        assert (inputs["input_ids"] == token).sum(1).tolist() == per_row
        if expected:
            assert feature_lengths(model, inputs, modality, len(expected)) == expected
        else:
            assert {"image": "pixel_values", "video": "pixel_values_videos"}[modality] not in inputs


def test_placeholder_count_formulas(models):
    assert placeholder_count(models("llava"), Image()) == 16
    assert placeholder_count(models("video_llava"), Image()) == 16
    assert placeholder_count(models("video_llava"), Video(3)) == 3 * 17
    assert [placeholder_count(models("llava_next"), Image(h, w)) for h, w in [(40, 60), (28, 28), (60, 40)]] == [
        70,
        36,
        72,
    ]
    ov = models("llava_onevision")
    assert placeholder_count(ov, Image(40, 60)) == 70
    assert placeholder_count(ov, Image(40, 60), multi_image=True) == 17
    assert placeholder_count(ov, Video(3)) == 3 * 4 + 1
    for family in QWEN:
        assert placeholder_count(models(family), Image(56, 84)) == 6
        assert placeholder_count(models(family), Video(4, 56, 56)) == 8


def test_onevision_anyres_max_downscaling_matches_the_model():
    """With pinpoints up to 4x4 tiles the anyres_max_9 interpolation kicks in (the default tiny pinpoints never do)."""
    config = tiny_config("llava_onevision")
    config.image_grid_pinpoints = [[28 * a, 28 * b] for a in range(1, 5) for b in range(1, 5)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODEL_CLASSES["llava_onevision"](config).eval()
    rows = [[2, Image(112, 112), 1], [Image(100, 90)]]
    inputs = tiny_inputs(model, rows)
    counts = [c for row in placeholder_counts(model, rows) for c in row]
    assert counts[0] == 16 + 12 * 12 + 12  # 16x16 grid scaled by 1/sqrt(256/144) -> 12x12, plus 12 newlines
    assert feature_lengths(model, inputs, "image", 2) == counts
    with torch.no_grad():
        model(**inputs)


# -- layout ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rows_are_padded_on_the_requested_side(models, family, padding_side):
    model = models(family)
    rows = [[1, Image()], [6, Image(), 2, Image(), 3], [4]]
    inputs = tiny_inputs(model, rows, padding_side=padding_side)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    lengths = mask.sum(1)
    assert lengths.max() == ids.shape[1] and lengths.min() < ids.shape[1]
    for b, n in enumerate(lengths.tolist()):
        valid = slice(ids.shape[1] - n, None) if padding_side == "left" else slice(0, n)
        expected = torch.zeros_like(mask[b])
        expected[valid] = 1
        assert torch.equal(mask[b], expected)
        assert (ids[b][mask[b] == 0] == PAD_TOKEN_ID).all()
        assert ids[b][valid][0] == BOS_TOKEN_ID
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == ids.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_row_layout_text_ids_and_qwen_wrapping(models, family):
    model = models(family)
    rows = [[5, Image(), 7, Image(), 2]]
    inputs = tiny_inputs(model, rows)
    ids = inputs["input_ids"][0].tolist()
    n = placeholder_counts(model, rows)[0][0]  # both images sit in one row: OneVision does not tile them
    wrap = family in QWEN
    visual = [VISION_START_TOKEN_ID, *[IMAGE_TOKEN_ID] * n, VISION_END_TOKEN_ID] if wrap else [IMAGE_TOKEN_ID] * n
    assert ids[0] == BOS_TOKEN_ID
    assert ids[6 : 6 + len(visual)] == visual
    assert ids[6 + len(visual) + 7 : 6 + 2 * len(visual) + 7] == visual
    text = ids[1:6] + ids[6 + len(visual) : 13 + len(visual)] + ids[-2:]
    assert len(ids) == 1 + 5 + 7 + 2 + 2 * len(visual)
    assert all(TEXT_TOKEN_LOW <= t <= TEXT_TOKEN_HIGH for t in text)
    if wrap:
        types = inputs["mm_token_type_ids"][0].tolist()
        assert types == [1 if t == IMAGE_TOKEN_ID else 0 for t in ids]


@pytest.mark.parametrize("family", QWEN)
def test_qwen_type_ids_and_grids(models, family):
    model = models(family)
    inputs = tiny_inputs(model, [[1, Image(56, 84), Video(4, 28, 56)], [2]])
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    assert torch.equal(types, (ids == IMAGE_TOKEN_ID).long() + 2 * (ids == VIDEO_TOKEN_ID).long())
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert inputs["video_grid_thw"].tolist() == [[2, 2, 4]]
    assert inputs["pixel_values"].shape == (24, 3 * 2 * 14 * 14)
    assert inputs["pixel_values_videos"].shape == (16, 3 * 2 * 14 * 14)
    assert ("second_per_grid_ts" in inputs) == (family == "qwen2_5_vl")


def test_onevision_batch_num_images_and_patch_counts(models):
    model = models("llava_onevision")
    inputs = tiny_inputs(model, [[1, Image(40, 60)], [3], [Image(), 1, Image(56, 28)]])
    assert inputs["batch_num_images"].tolist() == [1, 2]  # rows without images are left out, as in the processor
    assert inputs["image_sizes"].tolist() == [[40, 60], [28, 28], [56, 28]]
    assert inputs["pixel_values"].shape == (3, 5, 3, 28, 28)  # anyres 40x60 -> 4 crops + base; multi-image: 1 tile
    assert inputs["pixel_values"][1:, 1:].abs().sum() == 0


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_tiles_are_random_up_to_the_patch_count_then_zero(models, family):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model = models(family)
    rows = [[1, Image(40, 60), Image(), 1], [Image(28, 56)]]
    pixels = tiny_inputs(model, rows)["pixel_values"]
    tiled = [(im, family == "llava_next") for im in rows[0][1:3]] + [(rows[1][0], True)]
    for i, (im, tile) in enumerate(tiled):
        n = image_size_to_num_patches((im.height, im.width), model.config.image_grid_pinpoints, 28) if tile else 1
        assert (pixels[i, :n].flatten(1).abs().sum(1) > 0).all()
        assert pixels[i, n:].abs().sum() == 0


def test_inputs_are_seeded(models):
    model = models("llava_next")
    a, b = tiny_inputs(model, TWO_ROWS, seed=3), tiny_inputs(model, TWO_ROWS, seed=3)
    c = tiny_inputs(model, TWO_ROWS, seed=4)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert not torch.equal(a["pixel_values"], c["pixel_values"])


# -- errors ----------------------------------------------------------------------------------------------------


def test_unknown_family_lists_the_families():
    with pytest.raises(ValueError, match="llava_onevision"):
        tiny_model("llava2")
    with pytest.raises(ValueError, match="unknown family"):
        tiny_config("blip")


@pytest.mark.parametrize(
    ("family", "item", "match"),
    [
        ("llava", Video(), "no video input"),
        ("llava_next", Video(), "no video input"),
        ("llava", Image(40, 60), "28 x 28"),
        ("video_llava", Image(56, 56), "28 x 28"),
        ("video_llava", Video(2, 40, 28), "28 x 28"),
        ("llava_onevision", Video(2, 56, 56), "28 x 28"),
        ("qwen2_vl", Image(30, 28), "multiples of 28"),
        ("qwen2_5_vl", Image(28, 42), "multiples of 28"),
        ("qwen2_vl", Video(3), "multiple of 2"),
    ],
)
def test_invalid_items_are_rejected(models, family, item, match):
    with pytest.raises(ValueError, match=match):
        tiny_inputs(models(family), [[1, item]])
    with pytest.raises(ValueError, match=match):
        placeholder_count(models(family), item)


@pytest.mark.parametrize("family", ["llava_onevision", "video_llava"])
def test_videos_of_one_batch_need_the_same_frame_count(models, family):
    with pytest.raises(ValueError, match="same number of frames"):
        tiny_inputs(models(family), [[Video(2)], [Video(3)]])


@pytest.mark.parametrize(
    ("rows", "kwargs", "error", "match"),
    [
        ([[1, Image()]], {"padding_side": "middle"}, ValueError, "padding_side"),
        ([], {}, ValueError, "non-empty"),
        ([1, Image()], {}, ValueError, "list of items"),
        ([[1, "x"]], {}, TypeError, "int, Image or Video"),
        ([[True]], {}, TypeError, "int, Image or Video"),
        ([[-1]], {}, ValueError, ">= 0"),
    ],
)
def test_malformed_rows_are_rejected(models, rows, kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny_inputs(models("llava"), rows, **kwargs)


def test_items_validate_their_sizes():
    with pytest.raises(ValueError, match="positive"):
        Image(0, 28)
    with pytest.raises(ValueError, match="positive"):
        Video(frames=0)


def test_family_of_rejects_other_models():
    with pytest.raises(TypeError, match="unsupported model class"):
        family_of(torch.nn.Linear(1, 1))


# -- parity with the real processors ---------------------------------------------------------------------------


PARITY = [
    ("llava", TWO_ROWS),
    ("llava_next", [[3, Image(40, 60), 4], [2, Image(60, 40), 3, Image(), 2], [1, Image(100, 30), Image(33, 77)]]),
    ("llava_onevision", [[3, Image(40, 60), 4], [5], [2, Image(60, 40), 3, Image(), 2], [Image(200, 300)]]),
    ("qwen2_vl", [[3, Image(56, 84), 4], [2, Image(), 3, Image(28, 112), 2]]),
    ("qwen2_5_vl", [[3, Image(56, 84), 4], [2, Image(), 3, Image(28, 112), 2]]),
    ("video_llava", TWO_ROWS),
]


@pytest.mark.parametrize(("family", "rows"), PARITY, ids=[f for f, _ in PARITY])
def test_inputs_match_the_real_processor_for_images(models, family, rows):
    from PIL import Image as PILImage

    processor = tiny_processor(family)  # the family's real processor class (images only, PIL backend)
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>" if family in QWEN else "<image>"
    rng = np.random.default_rng(0)
    texts, images = [], []
    for row in rows:
        words, row_images = ["<s>"], []
        for it in row:
            if isinstance(it, int):
                words += ["image"] * it
            else:
                words.append(placeholder)
                row_images.append(PILImage.fromarray(rng.integers(0, 255, (it.height, it.width, 3), dtype=np.uint8)))
        texts.append(" ".join(words))
        images.append(row_images)
    if family == "llava":
        images = [im for row in images for im in row]
    options = {"return_legacy_image_output": False} if family == "video_llava" else {}  # `pixel_values`
    ref = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False, **options)
    mine = tiny_inputs(models(family), rows)
    assert set(ref.keys()) == set(mine.keys())
    for key in ref:
        assert ref[key].shape == mine[key].shape, key
        if key == "input_ids":
            assert torch.equal(ref[key] == IMAGE_TOKEN_ID, mine[key] == IMAGE_TOKEN_ID)
            assert torch.equal(ref[key] >= VISION_END_TOKEN_ID, mine[key] >= VISION_END_TOKEN_ID)
        elif key == "pixel_values":
            if ref[key].dim() == 5:  # anyres: the same tiles are filled, the padding tiles are zero
                assert torch.equal(ref[key].flatten(2).abs().sum(-1) > 0, mine[key].flatten(2).abs().sum(-1) > 0)
        else:
            assert torch.equal(ref[key], mine[key].to(ref[key].dtype)), key
