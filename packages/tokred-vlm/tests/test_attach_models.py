"""attach() on every supported model class: keep-all identity, and reduced runs against the independent reference."""

from __future__ import annotations

import pytest
import torch

from tokred.core import create_reducer
from tokred.vlm import attach
from tokred.vlm.models import ADAPTERS
from tokred.vlm.testing import FAMILIES, SAMPLE_ROWS, Image, Video, tiny_inputs, tiny_model

ROWS = SAMPLE_ROWS
FAMILY = {name: ADAPTERS.get(name) for name in ADAPTERS.names()}
STEPS = 4


def _generate(model, inputs, **kwargs):
    settings = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    settings.update(kwargs)
    with torch.no_grad():
        return model.generate(**inputs, **settings)


def _spaces(family):
    return ["llm"] if FAMILY[family].vision_space_refusal else ["llm", "vision"]


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ("eager", "sdpa")], ids=lambda p: "-".join(p))
def model_case(request):
    family, attn = request.param
    model = tiny_model(family, attn_implementation=attn, seed=0)
    inputs = tiny_inputs(model, ROWS[family], seed=1)
    return family, model, inputs


def test_families_cover_every_supported_class():
    assert sorted(FAMILIES) == sorted(FAMILY)


def test_keep_all_is_identical_to_the_unmodified_model(model_case):
    family, model, inputs = model_case
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = _generate(model, inputs)
    for space in _spaces(family):
        for positions in ("original", "compact"):
            with attach(model, create_reducer("uniform", num_keep=10_000), space=space, positions=positions) as handle:
                with torch.no_grad():
                    assert torch.equal(model(**inputs).logits, logits), (space, positions)
                out = _generate(model, inputs)
                assert handle.last_stats.reduced_length == handle.last_stats.original_length
            assert torch.equal(out.sequences, expected.sequences)
            for step, (got, want) in enumerate(zip(out.logits, expected.logits, strict=True)):
                assert torch.equal(got, want), (space, positions, step)


REDUCERS = {
    "tome": lambda: create_reducer("tome", keep_ratio=0.5),
    "norm": lambda: create_reducer("norm", num_keep=3),
    "apet": lambda: create_reducer("apet", num_keep=3, num_basis=2),
    "apet-reference": lambda: create_reducer("apet", num_keep=3, num_basis=2, variant="reference"),
}


@pytest.mark.parametrize("reducer_name", list(REDUCERS))
def test_reduced_run_matches_the_independent_reference(model_case, reference, reducer_name):
    family, model, inputs = model_case
    reducer = REDUCERS[reducer_name]()
    positions = FAMILY[family].default_positions
    with attach(model, reducer, space="llm") as handle:
        with torch.no_grad():
            logits = model(**inputs).logits
        stats = handle.last_stats
        out = _generate(model, inputs)
    want_forward = reference(model, family, inputs, ROWS[family], reducer, positions=positions, mode="forward")
    want = reference(model, family, inputs, ROWS[family], reducer, positions=positions, mode="generate", steps=STEPS)
    # The prefill is shorter by exactly the dropped visual tokens, and equals the reference's.
    valid = inputs["attention_mask"].sum(1)
    dropped = stats.visual_tokens - stats.kept_visual_tokens
    assert dropped > 0
    assert int(valid.sum()) - dropped == sum(want.lengths)
    assert logits.shape[1] == max(want.lengths) == stats.reduced_length < stats.original_length
    real = torch.zeros(logits.shape[:2], dtype=torch.bool)  # padding columns carry no meaning
    for row, length in enumerate(want.lengths):
        real[row, logits.shape[1] - length :] = True
    torch.testing.assert_close(logits[real], want_forward.prefill_logits[real], rtol=1e-5, atol=1e-5)
    for step, (got, expected) in enumerate(zip(out.logits, want.step_logits, strict=True)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1] :], want.tokens)
    # The reduction is real: the unmodified model predicts something else.
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
    assert not torch.allclose(full, logits[:, -1], atol=1e-4)


def test_each_row_alone_gives_the_same_result_as_in_the_batch(model_case):
    family, model, inputs = model_case
    reducer = create_reducer("tome", keep_ratio=0.5)
    with attach(model, reducer):
        batch = _generate(model, inputs)
        for row, _spec in enumerate(ROWS[family]):
            alone = _generate(model, _row(model, family, row))
            assert torch.equal(alone.sequences[0, -STEPS:], batch.sequences[row, -STEPS:])
            for got, want in zip(alone.logits, batch.logits, strict=True):
                torch.testing.assert_close(got[0], want[row], rtol=1e-4, atol=1e-5)


def _row(model, family, row):
    """The inputs of one row of the batch, built as the batch built them (same pixels, same text)."""
    full = tiny_inputs(model, ROWS[family], seed=1)
    mask = full["attention_mask"][row].bool()
    single = {
        "input_ids": full["input_ids"][row, mask][None],
        "attention_mask": full["attention_mask"][row, mask][None],
    }
    if "mm_token_type_ids" in full:
        single["mm_token_type_ids"] = full["mm_token_type_ids"][row, mask][None]
    counts = _media_counts(ROWS[family])
    images_before = sum(c[0] for c in counts[:row])
    videos_before = sum(c[1] for c in counts[:row])
    images, videos = counts[row]
    for key, value in full.items():
        if key in single or value is None:
            continue
        if key in ("pixel_values", "image_sizes", "batch_num_images") and family not in ("qwen2_vl", "qwen2_5_vl"):
            if key == "batch_num_images":
                single[key] = value[row : row + 1]
            else:
                single[key] = value[images_before : images_before + images]
        elif key == "pixel_values_videos" and family not in ("qwen2_vl", "qwen2_5_vl"):
            single[key] = value[videos_before : videos_before + videos]
        elif key == "image_grid_thw":
            single[key] = value[images_before : images_before + images]
            patches = value.prod(-1)
            start = int(patches[:images_before].sum())
            single["pixel_values"] = full["pixel_values"][
                start : start + int(patches[images_before : images_before + images].sum())
            ]
        elif key == "video_grid_thw":
            single[key] = value[videos_before : videos_before + videos]
            patches = value.prod(-1)
            start = int(patches[:videos_before].sum())
            single["pixel_values_videos"] = full["pixel_values_videos"][
                start : start + int(patches[videos_before : videos_before + videos].sum())
            ]
    return {k: v for k, v in single.items() if not (isinstance(v, torch.Tensor) and v.numel() == 0)}


def _media_counts(rows):
    return [(sum(isinstance(x, Image) for x in r), sum(isinstance(x, Video) for x in r)) for r in rows]


@pytest.mark.parametrize("family", ["llava", "video_llava"])
@pytest.mark.parametrize("reducer_name", ["tome", "norm", "apet"])
def test_vision_space_matches_the_independent_reference(reference, family, reducer_name):
    """space="vision" merges in the vision tower's space and projects afterwards (ApET's LLaVA setting)."""
    model = tiny_model(family, attn_implementation="sdpa")
    inputs = tiny_inputs(model, ROWS[family], seed=2)
    reducer = create_reducer(reducer_name, num_keep=5)
    if reducer_name == "apet":
        reducer = create_reducer("apet", num_keep=5, num_basis=2)
    positions = FAMILY[family].default_positions
    with attach(model, reducer, space="vision") as handle:
        out = _generate(model, inputs)
        stats = handle.last_stats
    want = reference(model, family, inputs, ROWS[family], reducer, positions=positions, steps=STEPS, space="vision")
    assert stats.reduced_length == max(want.lengths) < stats.original_length
    for step, (got, expected) in enumerate(zip(out.logits, want.step_logits, strict=True)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    # Merging before the projector is not the same as merging after it.
    llm = reference(model, family, inputs, ROWS[family], reducer, positions=positions, steps=1, space="llm")
    assert not torch.allclose(llm.step_logits[0], want.step_logits[0], atol=1e-4)


def _group_sizes(item_groups, model, family, rows):
    """(group sizes, structural token count) of every image and video in the rows, written out by hand."""
    sizes, structural = [], 0
    for row in rows:
        items = [x for x in row if not isinstance(x, int)]
        multi = family == "llava_onevision" and sum(isinstance(x, Image) for x in items) > 1
        for item in items:
            labels = item_groups(family, model, item, multi_image=multi)
            structural += labels.count(-1)
            sizes += [labels.count(g) for g in sorted(set(labels) - {-1})]
    return sizes, structural


@pytest.mark.parametrize(("family", "space"), [(f, s) for f in FAMILIES for s in _spaces(f)])
def test_every_image_crop_and_frame_is_its_own_group(hand_groups, family, space):
    model = tiny_model(family)
    inputs = tiny_inputs(model, ROWS[family], seed=4)
    budget = 3
    with attach(model, create_reducer("norm", num_keep=budget), space=space) as handle, torch.no_grad():
        model(**inputs)
    sizes, structural = _group_sizes(hand_groups, model, family, ROWS[family])
    stats = handle.last_stats
    assert stats.groups == len(sizes)
    assert stats.kept_visual_tokens == sum(min(budget, n) for n in sizes) + structural


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_video_groups_video_gives_one_budget_per_video(family):
    model = tiny_model(family)
    rows = [[2, Video(4, 56, 56) if family == "qwen2_vl" else Video(3), 2]]
    inputs = tiny_inputs(model, rows)
    with attach(model, create_reducer("norm", num_keep=3), video_groups="frame") as handle, torch.no_grad():
        model(**inputs)
    frames = handle.last_stats
    with attach(model, create_reducer("norm", num_keep=3), video_groups="video") as handle, torch.no_grad():
        model(**inputs)
    whole = handle.last_stats
    newline = 1 if family == "llava_onevision" else 0
    assert whole.groups == 1 and frames.groups == (2 if family == "qwen2_vl" else 3)
    assert whole.kept_visual_tokens == 3 + newline
    assert frames.kept_visual_tokens == 3 * frames.groups + newline
