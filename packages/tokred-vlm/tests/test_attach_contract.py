"""attach()'s contract: detach restores the model, bad input gets a clear error, handles stay independent."""

from __future__ import annotations

import pytest
import torch

from tokred.core import (
    IncompatibleReducerError,
    InvalidTypeError,
    Reducer,
    ReducerContractError,
    Reduction,
    TokredError,
    UnknownReducerError,
    create_reducer,
)
from tokred.vlm import ApET, attach, supported_model_names
from tokred.vlm.testing import IMAGE_TOKEN_ID, Image, Video, tiny_inputs, tiny_model

ROWS = [[3, Image(), 4], [2, Image(), 3, Image(), 2]]


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2_vl", attn_implementation="sdpa")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _hook_counts(model):
    return [
        (len(m._forward_pre_hooks), len(m._forward_hooks), sorted(k for k in vars(m) if k.startswith(("get_", "pack"))))
        for m in model.modules()
    ]


def test_detach_restores_the_model_exactly(llava):
    inputs = tiny_inputs(llava, ROWS)
    before_logits = _logits(llava, inputs)
    before_hooks = _hook_counts(llava)
    before_state = {k: v.clone() for k, v in llava.state_dict().items()}
    handle = attach(llava, create_reducer("tome", num_keep=4), space="vision")
    assert handle.attached
    assert _logits(llava, inputs).shape[1] < before_logits.shape[1]
    handle.detach()
    assert not handle.attached
    assert _hook_counts(llava) == before_hooks
    assert torch.equal(_logits(llava, inputs), before_logits)
    assert all(torch.equal(v, before_state[k]) for k, v in llava.state_dict().items())
    handle.detach()  # a second detach is harmless


def test_context_manager_detaches_even_on_error(llava):
    inputs = tiny_inputs(llava, ROWS)
    with pytest.raises(KeyError), attach(llava, create_reducer("random", num_keep=3, seed=0)):
        raise KeyError("boom")
    assert torch.equal(_logits(llava, inputs), _logits(tiny_model("llava", attn_implementation="sdpa"), inputs))


def test_attaching_twice_is_an_error(llava):
    with attach(llava, create_reducer("norm", num_keep=3)) as first:
        with pytest.raises(RuntimeError, match=r"already attached.*detach"):
            attach(llava, create_reducer("norm", num_keep=5))
        assert first.attached
    attach(llava, create_reducer("norm", num_keep=5)).detach()  # free again once detached


def test_two_models_attached_at_once_do_not_interfere(llava, qwen):
    llava_inputs = tiny_inputs(llava, ROWS)
    qwen_inputs = tiny_inputs(qwen, [[3, Image(56, 56), 2, Video(2, 56, 56), 1]])
    with attach(llava, create_reducer("norm", num_keep=3)):
        llava_alone = _logits(llava, llava_inputs)
    with attach(qwen, create_reducer("tome", keep_ratio=0.5)):
        qwen_alone = _logits(qwen, qwen_inputs)
    with attach(llava, create_reducer("norm", num_keep=3)), attach(qwen, create_reducer("tome", keep_ratio=0.5)):
        for _ in range(2):  # interleaved calls
            assert torch.equal(_logits(qwen, qwen_inputs), qwen_alone)
            assert torch.equal(_logits(llava, llava_inputs), llava_alone)


def test_unsupported_model_names_the_supported_ones():
    with pytest.raises(TypeError, match=r"LlavaForConditionalGeneration.*Qwen2VLForConditionalGeneration"):
        attach(torch.nn.Linear(2, 2), create_reducer("norm", num_keep=3))
    assert "VideoLlavaForConditionalGeneration" in supported_model_names()


def test_bad_arguments_are_refused(llava, qwen):
    reducer = create_reducer("norm", num_keep=3)
    with pytest.raises(ValueError, match="space must be"):
        attach(llava, reducer, space="pixels")
    with pytest.raises(ValueError, match="positions must be"):
        attach(llava, reducer, positions="shuffled")
    with pytest.raises(ValueError, match="video_groups must be"):
        attach(llava, reducer, video_groups="clip")
    with pytest.raises(TypeError, match="must be a tokred Reducer"):
        attach(llava, lambda tokens: tokens)
    with pytest.raises(ValueError, match=r"space='vision' is not possible for Qwen2-VL: its merger"):
        attach(qwen, reducer, space="vision")
    onevision = tiny_model("llava_onevision")
    with pytest.raises(ValueError, match=r"space='vision' is not possible for LLaVA-OneVision"):
        attach(onevision, reducer, space="vision")
    with pytest.raises(IncompatibleReducerError, match=r"'caller' scores, which tokred\.vlm does not supply"):
        attach(llava, create_reducer("topk", num_keep=3))
    with pytest.raises(IncompatibleReducerError, match=r"has no budget; give it one, e\.g\. ApET\(num_keep=64\)"):
        attach(llava, ApET())
    with pytest.raises(
        InvalidTypeError, match=r"reducer instance, such as ApET\(num_keep=64\) or its registered name \('apet'\)"
    ):
        attach(llava, ApET)
    with pytest.raises(InvalidTypeError, match="go with a reducer given by name"):
        attach(llava, reducer, num_basis=3)
    with pytest.raises(UnknownReducerError, match=r"unknown reducer 'apte'\. Did you mean 'apet'"):
        attach(llava, "apte", num_keep=3)


def test_a_reducer_given_by_name_is_built_with_its_config(llava):
    inputs = tiny_inputs(llava, ROWS)
    with attach(llava, "apet", num_keep=5, num_basis=2) as handle:
        by_name = _logits(llava, inputs)
        assert isinstance(handle.reducer, ApET) and handle.reducer.num_basis == 2
    with attach(llava, ApET(num_keep=5, num_basis=2)):
        assert torch.equal(_logits(llava, inputs), by_name)


def test_every_refusal_is_a_tokred_error(llava):
    for call in (
        lambda: attach(llava, ApET),
        lambda: attach(llava, ApET()),
        lambda: attach(llava, "apet", num_keep=2, space="pixels"),
        lambda: attach(torch.nn.Linear(2, 2), "apet", num_keep=2),
    ):
        with pytest.raises(TokredError):
            call()


def test_a_budget_larger_than_a_group_keeps_everything(llava):
    inputs = tiny_inputs(llava, ROWS)
    with attach(llava, create_reducer("norm", num_keep=16)) as handle:  # exactly the 16 tokens of an image
        assert torch.equal(_logits(llava, inputs), _logits_detached(llava, inputs, handle))
        assert handle.last_stats.kept_visual_tokens == handle.last_stats.visual_tokens


def _logits_detached(model, inputs, handle):
    handle.detach()
    try:
        return _logits(model, inputs)
    finally:
        handle._install()


def test_images_without_placeholders_raise_the_models_own_error(llava):
    inputs = tiny_inputs(llava, ROWS)
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, 5)
    with pytest.raises(ValueError) as unmodified:
        _logits(llava, inputs)
    with attach(llava, create_reducer("norm", num_keep=3)), pytest.raises(ValueError) as attached:
        _logits(llava, inputs)
    assert str(attached.value) == str(unmodified.value)


class _WrongCount(Reducer):
    """Claims a budget of 3 but returns 4 tokens: a broken plug-in."""

    name = "wrong-count"

    def __call__(self, tokens, **kwargs):
        return Reduction.from_selection(tokens, torch.arange(4).expand(tokens.shape[0], 4))

    def reduce(self, tokens, num_keep, *, scores, protected, sizes):  # pragma: no cover - never reached
        raise AssertionError


def test_a_reducer_whose_output_disagrees_with_its_budget_is_refused(llava):
    inputs = tiny_inputs(llava, ROWS)
    for space in ("llm", "vision"):
        with (
            attach(llava, _WrongCount(num_keep=3), space=space),
            pytest.raises(ReducerContractError, match=r"expected indices"),
        ):
            _logits(llava, inputs)


def test_chunked_prefill_is_not_implemented(llava):
    inputs = tiny_inputs(llava, ROWS[:1])
    with (
        attach(llava, create_reducer("norm", num_keep=3)),
        pytest.raises(NotImplementedError, match="prefill_chunk_size"),
    ):
        llava.generate(**inputs, max_new_tokens=2, prefill_chunk_size=8)


def test_continuing_a_cache_with_new_images_is_not_implemented(llava):
    inputs = tiny_inputs(llava, ROWS[:1])
    with attach(llava, create_reducer("norm", num_keep=3)), torch.no_grad():
        first = llava(**inputs, use_cache=True)
        more = tiny_inputs(llava, [[Image(), 2]])
        more["input_ids"] = more["input_ids"][:, 1:]  # a second turn: no BOS
        more["attention_mask"] = torch.ones(1, first.logits.shape[1] + more["input_ids"].shape[1], dtype=torch.long)
        with pytest.raises(NotImplementedError, match="continuing a cache with new images"):
            llava(**more, cache=first.cache)


def test_features_encoded_before_attach_are_refused(llava):
    inputs = tiny_inputs(llava, ROWS)
    with torch.no_grad():
        encoded = llava.model.get_image_features(pixel_values=inputs.pop("pixel_values"), return_dict=True)
        with attach(llava, create_reducer("norm", num_keep=3)), pytest.raises(RuntimeError, match="before attach"):
            llava(**inputs, mm_encoder_outputs={"image": encoded})


def test_a_text_only_call_passes_through(llava):
    inputs = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    expected = _logits(llava, inputs)
    with attach(llava, create_reducer("norm", num_keep=3)) as handle:
        assert torch.equal(_logits(llava, inputs), expected)
        assert handle.last_stats is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_half_precision_models_keep_their_dtype(family, dtype):
    model = tiny_model(family, attn_implementation="sdpa", dtype=dtype)
    rows = [[3, Image(), 4]] if family == "llava" else [[3, Image(56, 56), 4]]
    inputs = tiny_inputs(model, rows)
    with torch.no_grad():
        expected = model(**inputs).logits
    with attach(model, create_reducer("apet", num_keep=10_000)), torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)  # keep-all stays exact in half precision
    with attach(model, create_reducer("apet", num_keep=3, num_basis=2)) as handle, torch.no_grad():
        assert model(**inputs).logits.dtype == dtype
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert handle.last_stats.reduced_length < handle.last_stats.original_length
    assert all(torch.isfinite(step).all() for step in out.logits)


def test_one_budget_per_video_is_refused_for_video_llava():
    with pytest.raises(ValueError, match="not available for Video-LLaVA"):
        attach(tiny_model("video_llava"), create_reducer("norm", num_keep=3), video_groups="video")
