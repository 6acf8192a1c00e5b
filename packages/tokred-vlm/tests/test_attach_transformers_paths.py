"""The paths transformers' own model and generation tests take, through an attached model.

With a keep-all reducer every path must run exactly as on the unmodified model (padding columns, packed
sequences, placeholders without pixels, labels, a continued cache, compiled decoding); under real reduction,
two ways of computing the same thing must agree (assisted = greedy, continued = one call, packed = separate).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from tokred.core import create_reducer
from tokred.core.errors import InvalidInputError
from tokred.vlm import attach
from tokred.vlm.testing import (
    FAMILIES,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    SAMPLE_ROWS,
    VIDEO_TOKEN_ID,
    tiny_inputs,
    tiny_model,
)

STEPS = 3
# Families whose placeholders and features can be packed into one row as they are (LLaVA-OneVision tiles an
# image differently when a row holds several, and the Qwen models need hand-made 4-row packed positions).
PACKABLE = ("llava", "llava_next", "video_llava")


def keep_all():
    return create_reducer("apet", keep_ratio=1.0)


def reduced():
    return create_reducer("apet", keep_ratio=0.5)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    family = request.param
    model = tiny_model(family, attn_implementation="sdpa", seed=0)
    return family, model, tiny_inputs(model, SAMPLE_ROWS[family], seed=1)


def _generate(model, inputs, **kwargs):
    settings = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    settings.update(kwargs)
    with torch.no_grad():
        return model.generate(**inputs, **settings)


def _logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def _with_padding_column(inputs):
    """The same batch with one more left column that is padding in every row."""
    padded = dict(inputs)
    rows = inputs["input_ids"].shape[0]
    for key, fill in (("input_ids", PAD_TOKEN_ID), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if key in inputs:
            column = torch.full((rows, 1), fill, dtype=inputs[key].dtype)
            padded[key] = torch.cat([column, inputs[key]], dim=1)
    return padded


def _assert_same_generation(got, want, *, exact):
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits, strict=True)):
        if exact:
            assert torch.equal(a, b), step
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"step {step}")


# ------------------------------------------------------------------------------------ padding columns
def test_keep_all_leaves_a_padding_column_and_the_cache_as_they_are(case):
    _family, model, inputs = case
    inputs = _with_padding_column(inputs)
    logits = _logits(model, inputs)
    hidden = _logits_and_hidden(model, inputs)
    last = _logits(model, inputs, logits_to_keep=1)
    expected = _generate(model, inputs)
    expected_static = _generate(model, inputs, cache_implementation="static")
    with attach(model, keep_all()) as handle:
        assert torch.equal(_logits(model, inputs), logits)
        assert all(torch.equal(a, b) for a, b in zip(_logits_and_hidden(model, inputs), hidden, strict=True))
        assert torch.equal(_logits(model, inputs, logits_to_keep=1), last)
        out = _generate(model, inputs)
        _assert_same_generation(out, expected, exact=True)
        assert out.cache.get_seq_length() == expected.cache.get_seq_length()
        _assert_same_generation(_generate(model, inputs, cache_implementation="static"), expected_static, exact=True)
        assert handle.last_stats.kept_visual_tokens == handle.last_stats.visual_tokens


def _logits_and_hidden(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return (out.logits, *out.hidden_states)


def test_reduction_gives_the_same_answer_with_an_extra_padding_column(case):
    _family, model, inputs = case
    with attach(model, reduced()):
        plain = _generate(model, inputs)
        padded = _generate(model, _with_padding_column(inputs))
    # Padding moves no real token: the same tokens, and logits equal up to rounding.
    assert torch.equal(padded.sequences[:, 1:], plain.sequences)
    for a, b in zip(padded.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- packed sequences
def _packed(inputs):
    """The rows of a left-padded batch packed into one padding-free row, with restarting positions."""
    mask = inputs["attention_mask"].bool()
    packed = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    packed["input_ids"] = inputs["input_ids"][mask].unsqueeze(0)
    packed["position_ids"] = torch.cat([torch.arange(int(n)) for n in mask.sum(dim=1)]).unsqueeze(0)
    return packed


@pytest.mark.parametrize("family", PACKABLE)
def test_packed_rows_stay_apart_at_keep_all(family):
    model = tiny_model(family, attn_implementation="sdpa", seed=0)
    inputs = tiny_inputs(model, SAMPLE_ROWS[family], seed=1)
    packed = _packed(inputs)
    expected = _logits(model, packed, use_cache=False)
    with attach(model, keep_all()):
        assert torch.equal(_logits(model, packed, use_cache=False), expected)
    # The packed run is the padded batch's (packing was detected): real tokens agree.
    padded = _logits(model, inputs, use_cache=False)[inputs["attention_mask"].bool()]
    torch.testing.assert_close(expected[0], padded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", PACKABLE)
def test_reduced_packed_rows_match_each_row_reduced_alone(family):
    model = tiny_model(family, attn_implementation="sdpa", seed=0)
    rows = SAMPLE_ROWS[family]
    alone = [tiny_inputs(model, [row], seed=1) for row in rows]
    # The packed row is built from the single rows so that its pixels are exactly theirs.
    packed = _pack_singles(alone)
    with attach(model, reduced()) as handle:
        separate = []
        for single in alone:
            single = {k: v for k, v in single.items() if k != "attention_mask"}
            separate.append(_logits(model, single, use_cache=False)[0])
        together = _logits(model, packed, use_cache=False)[0]
        assert handle.last_stats.reduced_length < handle.last_stats.original_length
    torch.testing.assert_close(together, torch.cat(separate), rtol=1e-4, atol=1e-5)


def _pack_singles(alone):
    packed = {"input_ids": torch.cat([a["input_ids"] for a in alone], dim=1)}
    packed["position_ids"] = torch.cat([torch.arange(a["input_ids"].shape[1]) for a in alone]).unsqueeze(0)
    for key in dict.fromkeys(k for a in alone for k in a):
        if key not in ("input_ids", "attention_mask"):
            parts = [a[key] for a in alone if key in a]
            if parts[0].dim() == 5:  # anyres crops: zero-padded to the most crops, as the processor does
                most = max(part.shape[1] for part in parts)
                parts = [torch.nn.functional.pad(part, (0, 0, 0, 0, 0, 0, 0, most - part.shape[1])) for part in parts]
            packed[key] = torch.cat(parts, dim=0)
    return packed


def test_packed_rows_with_original_positions_are_refused():
    model = tiny_model("llava", attn_implementation="sdpa", seed=0)
    packed = _packed(tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1))
    with attach(model, reduced(), positions="original"), pytest.raises(NotImplementedError, match="compact"):
        _logits(model, packed, use_cache=False)


# ---------------------------------------------------------------------- placeholders without pixels
def test_placeholders_without_pixels_run_as_on_the_unmodified_model(case):
    _family, model, inputs = case
    text_only = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    expected = _logits(model, text_only)
    with attach(model, reduced()) as handle:
        assert torch.equal(_logits(model, text_only), expected)
        assert handle.last_stats is None  # nothing to reduce


@pytest.mark.parametrize("how", ["assistant", "prompt_lookup"])
def test_assisted_decoding_matches_greedy_search_under_reduction(case, how):
    family, model, inputs = case
    extra = dict(assistant_model=model) if how == "assistant" else dict(prompt_lookup_num_tokens=2)
    inputs = tiny_inputs(model, SAMPLE_ROWS[family][-1:], seed=1)  # transformers assists batches of one only
    with attach(model, reduced()):
        greedy = _generate(model, inputs)
        assisted = _generate(model, inputs, **extra)
    _assert_same_generation(assisted, greedy, exact=False)


def test_features_as_a_tuple_are_the_unmodified_models(case):
    family, model, inputs = case
    modality = "video" if family in ("llava_onevision", "video_llava") and "pixel_values" not in inputs else "image"
    function = getattr(model.model, f"get_{modality}_features")
    names = inspect.signature(function).parameters
    call = {k: v for k, v in inputs.items() if k in names}
    with torch.no_grad():
        expected = function(**call, return_dict=False)
        with attach(model, keep_all()):
            got = getattr(model.model, f"get_{modality}_features")(**call, return_dict=False)
    assert isinstance(got, tuple)
    leaves = [torch.utils._pytree.tree_leaves(out) for out in (got, expected)]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


# ----------------------------------------------------------------------------------------- labels
def _answer_labels(inputs, answer=2):
    """Labels on the last ``answer`` tokens of every row (the rows end in text), the ignore index elsewhere."""
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -answer:] = inputs["input_ids"][:, -answer:]
    return labels


def _loss_and_grads(model, inputs, **kwargs):
    model.zero_grad()
    loss = model(**inputs, **kwargs).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def test_keep_all_gives_the_same_loss_and_gradients(case):
    _family, model, inputs = case
    labels = _answer_labels(inputs)
    expected_loss, expected_grads = _loss_and_grads(model, inputs, labels=labels)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    expected_shifted = _loss_and_grads(model, inputs, labels=labels, shift_labels=shifted)[0]
    with attach(model, keep_all()):
        loss, grads = _loss_and_grads(model, inputs, labels=labels)
        assert torch.equal(_loss_and_grads(model, inputs, labels=labels, shift_labels=shifted)[0], expected_shifted)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    assert all(torch.equal(grads[name], expected_grads[name]) for name in grads)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_training_with_gradient_checkpointing_matches_the_unmodified_model(family):
    model = tiny_model(family, attn_implementation="sdpa", seed=0)
    inputs = tiny_inputs(model, SAMPLE_ROWS[family], seed=1)
    labels = _answer_labels(inputs)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    expected_loss, expected_grads = _loss_and_grads(model, inputs, labels=labels)
    with attach(model, keep_all()):
        loss, grads = _loss_and_grads(model, inputs, labels=labels)
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(grads[name], expected_grads[name]) for name in expected_grads)
    with attach(model, reduced()):
        reduced_loss, reduced_grads = _loss_and_grads(model, inputs, labels=labels)
    model.gradient_checkpointing_disable()
    model.eval()
    with attach(model, reduced()):  # checkpointing recomputes the same reduced forward
        plain_loss, plain_grads = _loss_and_grads(model, inputs, labels=labels)
    torch.testing.assert_close(reduced_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(reduced_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_reduced_loss_is_the_loss_of_the_shorter_sequence(case):
    _family, model, inputs = case
    answer = 2
    labels = _answer_labels(inputs, answer)
    with attach(model, reduced()) as handle:
        loss = model(**inputs, labels=labels).loss
        logits = _logits(model, inputs)
        assert handle.last_stats.reduced_length < handle.last_stats.original_length
    # Left padding right-aligns the reduced rows, so the answer is still the last tokens of every row.
    predicted = logits[:, -answer - 1 : -1].float()
    expected = torch.nn.functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), labels[:, -answer:].reshape(-1)
    )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()  # gradients flow through the reduction to the model's parameters
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    model.zero_grad()


def test_labels_that_do_not_match_the_prompt_are_refused():
    model = tiny_model("llava", attn_implementation="sdpa", seed=0)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    with attach(model, reduced()), pytest.raises(InvalidInputError, match="labels of shape"):
        model(**inputs, labels=_answer_labels(inputs)[:1])


# ---------------------------------------------------------------------------- continuing a cache
@pytest.mark.parametrize("make", [keep_all, reduced], ids=["keep_all", "reduced"])
def test_continuing_from_a_returned_cache_matches_one_call(case, make):
    _family, model, inputs = case
    with attach(model, make()):
        whole = _generate(model, inputs, max_new_tokens=2 * STEPS)
        first = _generate(model, inputs)
        continued_inputs = dict(inputs)
        continued_inputs["input_ids"] = first.sequences
        grown = torch.ones(first.sequences.shape[0], STEPS, dtype=inputs["attention_mask"].dtype)
        continued_inputs["attention_mask"] = torch.cat([inputs["attention_mask"], grown], dim=1)
        if "mm_token_type_ids" in inputs:
            continued_inputs["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, STEPS))
        for key in [k for k in continued_inputs if "pixel" in k or k.endswith("_thw") or k == "image_sizes"]:
            continued_inputs.pop(key)  # the images are in the cache already
        continued = _generate(model, continued_inputs, cache=first.cache)
    assert torch.equal(continued.sequences, whole.sequences)
    for a, b in zip(continued.logits, whole.logits[STEPS:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert continued.cache.get_seq_length() == whole.cache.get_seq_length()


@pytest.mark.parametrize("stages", [False, True], ids=["one_stage", "inner_stage"])
def test_a_reused_cache_forgets_the_last_sequence(stages):
    from transformers import StaticCache

    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=4)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    text = tiny_inputs(model, [[5], [5]], seed=2)  # a new prompt, text only
    expected = _generate(model, text, cache=StaticCache(config=model.config, max_cache_len=64))
    layers = {2: create_reducer("apet", keep_ratio=0.5)} if stages else None
    with attach(model, reduced(), layers=layers):
        cache = StaticCache(config=model.config, max_cache_len=64)
        _generate(model, inputs, cache=cache)
        cache.reset()  # the cache object is used again for another sequence
        got = _generate(model, text, cache=cache)
    _assert_same_generation(got, expected, exact=True)


# ------------------------------------------------------------------------------- the model's errors
def test_a_placeholder_count_mismatch_raises_the_models_own_error(case):
    _family, model, inputs = case
    broken = dict(inputs)
    ids = inputs["input_ids"].clone()
    visual = torch.isin(ids[-1], torch.tensor([IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]))
    first_placeholder = torch.nonzero(visual)[0, 0]  # one placeholder less
    ids[-1, first_placeholder] = 5
    broken["input_ids"] = ids
    with pytest.raises(Exception) as unmodified:
        _logits(model, broken)
    with attach(model, reduced()), pytest.raises(type(unmodified.value)) as attached:
        _logits(model, broken)
    assert str(attached.value) == str(unmodified.value)


def test_a_mismatch_the_model_lets_through_is_still_refused(monkeypatch):
    model = tiny_model("llava", attn_implementation="sdpa", seed=0)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    ids = inputs["input_ids"].clone()
    ids[-1, torch.nonzero(ids[-1] == IMAGE_TOKEN_ID)[0, 0]] = 5
    inputs["input_ids"] = ids

    def lenient(input_ids, inputs_embeds, image_features):  # a model without its own check
        return (input_ids == IMAGE_TOKEN_ID).unsqueeze(-1).expand_as(inputs_embeds)

    monkeypatch.setattr(model.model, "get_placeholder_mask", lenient)  # masked_scatter takes what it needs
    with attach(model, reduced()), pytest.raises(InvalidInputError, match="placeholder tokens"):
        _logits(model, inputs)


# ------------------------------------------------------------------------------------ compilation
@pytest.mark.parametrize("make", [keep_all, reduced], ids=["keep_all", "reduced"])
def test_full_graph_compiled_decoding_matches_eager_decoding(make):
    from transformers import CompileConfig

    model = tiny_model("llava", attn_implementation="sdpa", seed=0)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    compile_config = CompileConfig(fullgraph=True, backend="eager")
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told otherwise
    with attach(model, make()):
        eager = _generate(model, inputs, cache_implementation="static", disable_compile=True)
        compiled = _generate(model, inputs, cache_implementation="static", compile_config=compile_config)
    _assert_same_generation(compiled, eager, exact=False)
