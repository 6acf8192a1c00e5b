"""generate() modes through attach(), against the unmodified model run on the hand-reduced prefill."""

from __future__ import annotations

import pytest
import torch

import tokred.vlm.attachment as attach_module
import tokred.vlm.hooks.surgery as surgery_module
from tokred.core import create_reducer
from tokred.vlm import attach
from tokred.vlm.testing import Image, Video, tiny_inputs, tiny_model

LLAVA_ROWS = [[3, Image(), 4], [2, Image(), 3, Image(), 2]]
QWEN_ROWS = [[3, Image(56, 84), 4], [2, Image(56, 56), 3, Video(2, 56, 56), 2]]
STEPS = 4


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava", attn_implementation="sdpa")
    return model, tiny_inputs(model, LLAVA_ROWS, seed=3)


@pytest.fixture(scope="module")
def qwen():
    model = tiny_model("qwen2_vl", attn_implementation="sdpa")
    return model, tiny_inputs(model, QWEN_ROWS, seed=3)


MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=50, temperature=1.0),
    "beam": dict(do_sample=False, num_beams=3),
    "num_return_sequences": dict(do_sample=True, num_return_sequences=2),
    "beam_num_return_sequences": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "static_cache": dict(do_sample=False, cache_implementation="static"),
    "no_cache": dict(do_sample=False, use_cache=False),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_llava_generate_modes_match_generate_on_the_reduced_embeddings(llava, reference, mode):
    """LLaVA's default 'compact' positions are what generate itself gives inputs_embeds, so the unmodified model's
    own generate on the hand-reduced embeddings is an independent reference for every decoding mode."""
    model, inputs = llava
    reducer = create_reducer("tome", keep_ratio=0.5)
    settings = dict(max_new_tokens=STEPS, output_scores=True, return_dict_in_generate=True, **MODES[mode])
    want = reference(model, "llava", inputs, LLAVA_ROWS, reducer, positions="compact", steps=1)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model.generate(inputs_embeds=want.embeds, attention_mask=want.mask, **settings)
    with attach(model, reducer, space="llm", positions="compact"):
        torch.manual_seed(0)
        with torch.no_grad():
            got = model.generate(**inputs, **settings)
    assert torch.equal(got.sequences[:, -STEPS:], expected.sequences[:, -STEPS:])
    for step, (a, b) in enumerate(zip(got.scores, expected.scores, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("mode", ["greedy", "static_cache", "no_cache"])
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_llava_decode_matches_a_manual_loop(llava, reference, mode, positions):
    model, inputs = llava
    reducer = create_reducer("tome", keep_ratio=0.5)
    want = reference(model, "llava", inputs, LLAVA_ROWS, reducer, positions=positions, steps=STEPS)
    settings = dict(max_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True, **MODES[mode])
    with attach(model, reducer, space="llm", positions=positions), torch.no_grad():
        got = model.generate(**inputs, **settings)
    for step, (a, b) in enumerate(zip(got.logits, want.step_logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("mode", ["greedy", "static_cache", "no_cache"])
def test_qwen_decode_matches_a_manual_loop(qwen, reference, mode):
    model, inputs = qwen
    reducer = create_reducer("tome", keep_ratio=0.5)
    want = reference(model, "qwen2_vl", inputs, QWEN_ROWS, reducer, positions="original", steps=STEPS)
    settings = dict(max_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True, **MODES[mode])
    with attach(model, reducer), torch.no_grad():
        got = model.generate(**inputs, **settings)
    for step, (a, b) in enumerate(zip(got.logits, want.step_logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("mode", ["beam", "num_return_sequences", "beam_num_return_sequences"])
def test_qwen_expanded_generate_keeps_all_is_identical(qwen, mode):
    """Beams and returned sequences expand the batch after encoding; keep-all must still be exact."""
    model, inputs = qwen
    settings = dict(max_new_tokens=STEPS, output_scores=True, return_dict_in_generate=True, **MODES[mode])
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model.generate(**inputs, **settings)
    with attach(model, create_reducer("norm", num_keep=10_000)), torch.no_grad():
        torch.manual_seed(0)
        got = model.generate(**inputs, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores, strict=True):
        assert torch.equal(a, b)
    with attach(model, create_reducer("tome", keep_ratio=0.5)) as handle, torch.no_grad():
        torch.manual_seed(0)
        reduced = model.generate(**inputs, **settings)
        assert handle.last_stats.reduced_length < handle.last_stats.original_length
    assert reduced.sequences.shape[0] == expected.sequences.shape[0]


# --- Mutation checks: the tests above must catch a broken decode mask or broken decode positions. -------------


def _llava_decode_error(llava, reference):
    model, inputs = llava
    reducer = create_reducer("tome", keep_ratio=0.5)
    want = reference(model, "llava", inputs, LLAVA_ROWS, reducer, positions="compact", steps=STEPS)
    with attach(model, reducer, space="llm", positions="compact"), torch.no_grad():
        got = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return max(float((a - b).abs().max()) for a, b in zip(got.logits[1:], want.step_logits[1:], strict=True))


def test_mutation_decode_positions_from_the_cache_length_is_caught(llava, reference, monkeypatch):
    assert _llava_decode_error(llava, reference) < 1e-5
    # What transformers would do without translation: number the new token by the reduced cache length.
    monkeypatch.setattr(
        surgery_module,
        "decode_positions",
        lambda last, past, prefill, num_new: torch.full_like(last, past) + torch.arange(num_new),
    )
    assert _llava_decode_error(llava, reference) > 1e-4


def test_mutation_passing_generates_own_mask_is_caught(llava, reference, monkeypatch):
    original = attach_module.translate_decode

    def unpruned_mask(kwargs, state, cache):
        incoming = kwargs.get("attention_mask")
        out = original(kwargs, state, cache)
        if incoming is not None:
            out["attention_mask"] = incoming  # the mask in original coordinates, as generate built it
        return out

    monkeypatch.setattr(attach_module, "translate_decode", unpruned_mask)
    assert _llava_decode_error(llava, reference) > 1e-4
