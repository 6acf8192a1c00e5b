"""``attach(..., record_plans=True)``: the per-group plans of the last prefill match what the prefill kept."""

from __future__ import annotations

import pytest
import torch

from tokred.core import create_reducer
from tokred.vlm import ApET, attach
from tokred.vlm.attachment import GroupPlan
from tokred.vlm.testing import Image, Video, tiny_inputs, tiny_model


def _vision_features(model, pixels):
    """The pre-projector features of LLaVA-1.5 (feature layer, class token dropped), by hand: ``(I, n, C)``."""
    config = model.config
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return hidden[config.vision_feature_layer][:, 1:]


@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_llava_vision_plans_are_the_reducers_plans_per_image(entry):
    torch.manual_seed(0)
    model = tiny_model("llava")
    rows = [[3, Image(), 4], [2, Image(), 3, Image(), 2]]
    inputs = tiny_inputs(model, rows)
    reducer = ApET(num_keep=5, num_basis=2)
    with attach(model, reducer, record_plans=True) as handle, torch.no_grad():
        if entry == "forward":
            model(**inputs)
        else:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        plans = handle.last_plans
        stats = handle.last_stats
    assert [(p.modality, p.image, p.group) for p in plans] == [("image", 0, 0), ("image", 1, 0), ("image", 2, 0)]
    assert all(isinstance(p, GroupPlan) for p in plans)
    with torch.no_grad():
        features = _vision_features(model, inputs["pixel_values"])
    for plan, image in zip(plans, features, strict=True):
        expected = reducer(image.unsqueeze(0))
        assert plan.reduction.num_tokens == 16 and plan.reduction.num_kept == 5
        assert torch.equal(plan.reduction.indices, expected.indices)
        assert torch.equal(plan.reduction.assignment, expected.assignment)
        torch.testing.assert_close(plan.reduction.tokens, expected.tokens)
    assert sum(p.reduction.num_kept for p in plans) == stats.kept_visual_tokens == 15


def test_llava_vision_plans_are_what_the_decoder_receives():
    torch.manual_seed(1)
    model = tiny_model("llava")
    inputs = tiny_inputs(model, [[2, Image(), 3]])
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    with attach(model, create_reducer("tome", num_keep=6), record_plans=True) as handle, torch.no_grad():
        # Registered after attach(), so it runs after tokred's decoder hook and sees the reduced sequence.
        hook = model.get_decoder().register_forward_pre_hook(grab, with_kwargs=True)
        model(**inputs)
        hook.remove()
    assert seen["embeds"].shape[1] == 3 + 6 + 3
    (plan,) = handle.last_plans
    with torch.no_grad():
        projected = model.model.multi_modal_projector(plan.reduction.tokens)[0]  # (K, D)
    # The reduced sequence: <s>, 2 text tokens, the K kept visual tokens in order, 3 text tokens.
    torch.testing.assert_close(seen["embeds"][0, 3 : 3 + 6], projected)


def test_llm_space_plans_cover_every_group():
    torch.manual_seed(2)
    model = tiny_model("qwen2_vl")
    inputs = tiny_inputs(model, [[2, Image(56, 56), 3, Video(frames=4, height=28, width=56), 2]])
    with attach(model, create_reducer("norm", keep_ratio=0.5), record_plans=True) as handle, torch.no_grad():
        model(**inputs)
    plans, stats = handle.last_plans, handle.last_stats
    assert [(p.modality, p.image, p.group) for p in plans] == [("image", 0, 0), ("video", 0, 0), ("video", 0, 1)]
    assert len(plans) == stats.groups
    assert sum(p.reduction.num_kept for p in plans) == stats.kept_visual_tokens
    assert sum(p.reduction.num_tokens for p in plans) == stats.visual_tokens
    assert plans[0].reduction.tokens.shape[-1] == model.config.text_config.hidden_size  # LLM space


def test_anyres_vision_plans_are_per_crop():
    torch.manual_seed(3)
    model = tiny_model("llava_next")
    inputs = tiny_inputs(model, [[2, Image(56, 56), 3]])
    with attach(model, create_reducer("uniform", num_keep=4), record_plans=True) as handle, torch.no_grad():
        model(**inputs)
    plans, stats = handle.last_plans, handle.last_stats
    assert [p.group for p in plans] == list(range(stats.groups)) and {p.image for p in plans} == {0}
    assert all(p.reduction.num_kept == 4 and p.reduction.num_tokens == 16 for p in plans)
    newlines = stats.visual_tokens - 16 * stats.groups  # structural tokens, always kept
    assert sum(p.reduction.num_kept for p in plans) + newlines == stats.kept_visual_tokens


def test_plans_are_off_by_default():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, [[2, Image(), 3]])
    with attach(model, create_reducer("random", num_keep=4, seed=0)) as handle, torch.no_grad():
        model(**inputs)
    assert handle.record_plans is False and handle.last_plans is None
