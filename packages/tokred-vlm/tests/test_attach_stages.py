"""Inner stages (``attach(..., layers={L: reducer})``) against the unmodified model and a hand-written reference."""

from __future__ import annotations

import threading

import pytest
import torch

import tokred.vlm.attachment as attach_module
import tokred.vlm.hooks.stages as stages_module
from tokred.core import create_reducer
from tokred.core.errors import IncompatibleReducerError, InvalidInputError, InvalidTypeError
from tokred.vlm import attach, paper_schedule
from tokred.vlm.testing import FAMILIES, SAMPLE_ROWS, Image, tiny_inputs, tiny_model

LAYERS = 4
STAGE = 2  # the layers from 2 on see the shorter sequence
STEPS = 6
QWEN = ("qwen2_vl", "qwen2_5_vl")


def keep_all():
    return create_reducer("apet", keep_ratio=1.0)


def first_stage():
    return create_reducer("apet", keep_ratio=0.75, num_basis=2)


def inner_stage():
    return create_reducer("apet", keep_ratio=0.5, num_basis=2)


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ("eager", "sdpa")], ids="-".join)
def case(request):
    family, attn = request.param
    model = tiny_model(family, attn_implementation=attn, seed=0, decoder_layers=LAYERS)
    return family, model, tiny_inputs(model, SAMPLE_ROWS[family], seed=1)


def _generate(model, inputs, **kwargs):
    settings = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    settings.update(kwargs)
    with torch.no_grad():
        return model.generate(**inputs, **settings)


def _generate_positions(family, inputs):
    """The prefill positions ``generate`` gives the LLaVA models (the Qwen models compute their own)."""
    if family in QWEN:
        return {}
    mask = inputs["attention_mask"]
    return {"position_ids": (mask.long().cumsum(-1) - 1).clamp_min(0)}


def test_keep_all_inner_stage_is_identical_to_the_unmodified_model(case):
    _family, model, inputs = case
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = _generate(model, inputs)
    with attach(model, keep_all(), layers={1: keep_all(), STAGE: keep_all()}) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, logits)
        got = _generate(model, inputs)
        assert [s.length for s in handle.last_stats.stages] == [handle.last_stats.original_length] * 2
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))


def test_a_keep_all_inner_stage_leaves_the_first_stage_alone(case):
    _family, model, inputs = case
    with attach(model, first_stage()):
        expected = _generate(model, inputs)
    with attach(model, first_stage(), layers={STAGE: keep_all()}):
        got = _generate(model, inputs)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))


@pytest.mark.parametrize("first", ["keep_all", "reduced"])
def test_two_stages_match_the_hand_written_reference(case, inner_reference, first):
    family, model, inputs = case
    reducer = keep_all() if first == "keep_all" else first_stage()
    positions = "original" if family in QWEN else "compact"
    want = inner_reference(
        model, family, inputs, SAMPLE_ROWS[family], reducer, {STAGE: inner_stage()}, positions=positions, steps=STEPS
    )
    with attach(model, reducer, space="llm", positions=positions, layers={STAGE: inner_stage()}) as handle:
        with torch.no_grad():
            prefill = model(**inputs, **_generate_positions(family, inputs)).logits
        got = _generate(model, inputs)
        stats = handle.last_stats
    assert prefill.shape == want.prefill_logits.shape
    torch.testing.assert_close(prefill[want.prefill_mask], want.prefill_logits[want.prefill_mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(got.sequences[:, -STEPS:], want.tokens)
    for step, (a, b) in enumerate(zip(got.logits, want.step_logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert list(stats.layer_lengths) == want.layer_lengths
    # The KV cache is long below the stage and short from it on.
    lengths = [got.cache.get_seq_length(layer) for layer in range(LAYERS)]
    decoded = STEPS - 1  # the last token is not fed back
    assert lengths == [length + decoded for length in want.layer_lengths]
    assert lengths[STAGE] < lengths[STAGE - 1]


def test_original_positions_on_the_llava_models_match_the_reference(inner_reference):
    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=LAYERS)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    want = inner_reference(
        model, "llava", inputs, SAMPLE_ROWS["llava"], first_stage(), {STAGE: inner_stage()}, steps=STEPS
    )
    with attach(model, first_stage(), space="llm", positions="original", layers={STAGE: inner_stage()}):
        got = _generate(model, inputs)
    for step, (a, b) in enumerate(zip(got.logits, want.step_logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("mode", ["beam", "sampling", "static_cache", "no_cache", "assisted"])
def test_generate_modes_run_with_an_inner_stage(mode):
    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=LAYERS)
    rows = SAMPLE_ROWS["llava"][-1:] if mode == "assisted" else SAMPLE_ROWS["llava"]
    inputs = tiny_inputs(model, rows, seed=1)
    settings = {
        "beam": dict(num_beams=3, num_return_sequences=2),
        "sampling": dict(do_sample=True, top_k=20),
        "static_cache": dict(cache_implementation="static"),
        "no_cache": dict(use_cache=False),
        "assisted": dict(prompt_lookup_num_tokens=2),
    }[mode]
    with attach(model, first_stage(), layers={STAGE: inner_stage()}):
        greedy = _generate(model, inputs)
        torch.manual_seed(0)
        got = _generate(model, inputs, **settings)
    assert got.sequences.shape[1] == inputs["input_ids"].shape[1] + STEPS
    if mode in ("static_cache", "no_cache", "assisted"):  # the same greedy search another way
        assert torch.equal(got.sequences, greedy.sequences)
        for a, b in zip(got.logits, greedy.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_several_stages_give_a_pyramid(inner_reference):
    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=LAYERS)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    stages = {1: create_reducer("apet", keep_ratio=0.5, num_basis=2), 3: create_reducer("norm", keep_ratio=0.5)}
    want = inner_reference(model, "llava", inputs, SAMPLE_ROWS["llava"], first_stage(), stages, positions="compact")
    with attach(model, first_stage(), space="llm", layers=stages) as handle:
        got = _generate(model, inputs)
    for a, b in zip(got.logits, want.step_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    lengths = handle.last_stats.layer_lengths
    assert lengths[0] > lengths[1] > lengths[3] and lengths[1] == lengths[2]
    visual = handle.last_stats.layer_visual_tokens
    assert handle.last_stats.average_visual_tokens == pytest.approx(sum(visual) / LAYERS / handle.last_stats.groups)


def test_each_row_equals_the_row_alone():
    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=LAYERS)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    images = [0, *torch.tensor([sum(isinstance(x, Image) for x in row) for row in SAMPLE_ROWS["llava"]]).cumsum(0)]
    with attach(model, first_stage(), layers={STAGE: inner_stage()}):
        batch = _generate(model, inputs)
        for index in range(len(SAMPLE_ROWS["llava"])):
            real = inputs["attention_mask"][index].bool()
            alone = {
                "input_ids": inputs["input_ids"][index, real][None],
                "attention_mask": inputs["attention_mask"][index, real][None],
                "pixel_values": inputs["pixel_values"][images[index] : images[index + 1]],
            }
            single = _generate(model, alone)
            assert torch.equal(batch.sequences[index, -STEPS:], single.sequences[0, -STEPS:])
            for a, b in zip(batch.logits, single.logits, strict=True):
                torch.testing.assert_close(a[index], b[0], rtol=1e-4, atol=1e-5)


def test_detach_restores_the_model_exactly():
    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=LAYERS)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    with torch.no_grad():
        expected = model(**inputs).logits
    hooks = [len(layer._forward_pre_hooks) for layer in model.get_decoder().layers]
    handle = attach(model, first_stage(), layers={STAGE: inner_stage()})
    handle.detach()
    assert [len(layer._forward_pre_hooks) for layer in model.get_decoder().layers] == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_threads_get_what_they_get_alone():
    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=LAYERS)
    rows = [[3, *SAMPLE_ROWS["llava"][1][1:]], SAMPLE_ROWS["llava"][0]]
    inputs = [tiny_inputs(model, [row], seed=seed) for seed, row in enumerate(rows * 2)]
    with attach(model, first_stage(), layers={STAGE: inner_stage()}):
        alone = [_generate(model, item).sequences for item in inputs]
        results: list = [None] * len(inputs)

        def run(index):
            results[index] = _generate(model, inputs[index]).sequences

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert all(torch.equal(a, b) for a, b in zip(results, alone, strict=True))


def test_the_loss_is_that_of_the_last_stages_sequence():
    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=LAYERS)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]  # every row ends with two text tokens
    with attach(model, first_stage(), layers={STAGE: inner_stage()}):
        loss = model(**inputs, labels=labels).loss
        with torch.no_grad():
            logits = model(**inputs).logits
    predicted = logits[:, -3:-1].reshape(-1, logits.shape[-1])  # the rows stay right-aligned in every stage
    expected = torch.nn.functional.cross_entropy(predicted, labels[:, -2:].reshape(-1))
    torch.testing.assert_close(loss.detach(), expected)


def test_stats_count_the_decoders_operations():
    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=LAYERS)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    with attach(model, first_stage(), layers={STAGE: inner_stage()}) as handle, torch.no_grad():
        model(**inputs)
    stats = handle.last_stats
    config = model.get_decoder().config
    width, mlp, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = config.num_key_value_heads
    head = config.head_dim

    def layer(n):  # written out: q, k, v, o projections, scores and weighted sum, gated MLP
        return (
            2 * n * width * heads * head
            + 4 * n * width * kv * head
            + 2 * n * heads * head * width
            + (4 * heads * n * n * head + 6 * n * width * mlp)
        )

    assert stats.decoder_flops == 2 * sum(layer(n) for n in stats.layer_lengths)
    assert stats.dense_decoder_flops == 2 * LAYERS * layer(stats.original_length)
    assert stats.decoder_flops < stats.dense_decoder_flops


def test_the_paper_schedule_averages_to_the_asked_budget():
    deep = tiny_model("llava", seed=0, decoder_layers=32)
    schedule = paper_schedule(deep, average=64)
    assert list(schedule["layers"]) == [16]
    assert schedule["reducer"].budget.resolve(576) == 96 and schedule["layers"][16].budget.resolve(96) == 32
    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=LAYERS)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    with attach(model, **paper_schedule(model, average=8, num_basis=2)) as handle, torch.no_grad():
        model(**inputs)  # 16-token images: 12 in layers 0-1, 4 in layers 2-3
    assert handle.last_stats.layer_visual_tokens == (36, 36, 12, 12)
    assert handle.last_stats.average_visual_tokens == 8
    qwen = paper_schedule(tiny_model("qwen2_vl", seed=0, decoder_layers=28), average_ratio=0.2)
    assert list(qwen["layers"]) == [14]
    assert qwen["reducer"].budget.resolve(100) == 30 and qwen["layers"][14].budget.resolve(30) == 10


def test_bad_paper_schedules_are_refused():
    model = tiny_model("llava", seed=0, decoder_layers=LAYERS)
    for kwargs in ({}, {"average": 64, "average_ratio": 0.2}, {"average": 1}, {"average": 6.5}, {"average_ratio": 0.7}):
        with pytest.raises(InvalidInputError):
            paper_schedule(model, **kwargs)
    with pytest.raises(InvalidInputError, match="at least 2 layers"):
        paper_schedule(tiny_model("llava", seed=0, decoder_layers=1), average=64)


# --- Bad input -------------------------------------------------------------------------------------------------


def test_bad_stages_are_refused():
    model = tiny_model("llava", seed=0, decoder_layers=LAYERS)
    for layer in (0, LAYERS, -1, 1.5, True):
        with pytest.raises(InvalidInputError, match="from 1 to 3"):
            attach(model, first_stage(), layers={layer: inner_stage()})
    with pytest.raises(InvalidTypeError, match="must be a tokred Reducer"):
        attach(model, first_stage(), layers={2: "apet"})
    with pytest.raises(InvalidTypeError, match="dict from a decoder layer"):
        attach(model, first_stage(), layers=[(2, inner_stage())])
    with pytest.raises(IncompatibleReducerError, match="scores"):
        attach(model, first_stage(), layers={2: create_reducer("topk", num_keep=3)})
    with pytest.raises(IncompatibleReducerError, match="no budget"):
        attach(model, first_stage(), layers={2: create_reducer("apet")})
    qwen = tiny_model("qwen2_vl", seed=0, decoder_layers=LAYERS)
    with pytest.raises(IncompatibleReducerError, match="M-RoPE"):
        attach(qwen, first_stage(), positions="compact", layers={2: inner_stage()})


def test_an_inner_budget_above_what_is_left_keeps_everything():
    model = tiny_model("llava", attn_implementation="sdpa", seed=0, decoder_layers=LAYERS)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    with attach(model, create_reducer("apet", num_keep=4)):
        expected = _generate(model, inputs)
    # The later stage asks for more than the first stage left: it keeps all (stages only ever shorten).
    with attach(model, create_reducer("apet", num_keep=4), layers={STAGE: create_reducer("apet", num_keep=8)}) as h:
        got = _generate(model, inputs)
        assert h.last_stats.stages[0].kept_visual_tokens == h.last_stats.kept_visual_tokens
    assert torch.equal(got.sequences, expected.sequences)


# --- Mutation checks: the reference comparison must catch each plausible mistake. ------------------------------


def _llava_error(inner_reference, positions="compact"):
    model = tiny_model("llava", attn_implementation="eager", seed=0, decoder_layers=LAYERS)
    inputs = tiny_inputs(model, SAMPLE_ROWS["llava"], seed=1)
    want = inner_reference(
        model, "llava", inputs, SAMPLE_ROWS["llava"], first_stage(), {STAGE: inner_stage()}, positions=positions
    )
    try:
        with attach(model, first_stage(), space="llm", positions=positions, layers={STAGE: inner_stage()}):
            got = _generate(model, inputs)
    except RuntimeError:
        return float("inf")  # a crash is caught as well
    return max(float((a - b).abs().max()) for a, b in zip(got.logits, want.step_logits, strict=True))


def test_mutation_reusing_the_decoders_long_mask_is_caught(inner_reference, monkeypatch):
    assert _llava_error(inner_reference) < 1e-5
    original = attach_module.Attachment._layer_pre_hook

    def long_mask(self, index, module, args, kwargs):
        out = original(self, index, module, args, kwargs)
        if out is not None:
            out[1]["attention_mask"] = kwargs["attention_mask"]
        return out

    monkeypatch.setattr(attach_module.Attachment, "_layer_pre_hook", long_mask)
    assert _llava_error(inner_reference) > 1e-4


def test_mutation_positions_from_the_short_cache_length_are_caught(inner_reference, monkeypatch):
    # What a decoder would do on its own: number a new token by its layer's (short) cache length.
    monkeypatch.setattr(
        stages_module,
        "decode_positions",
        lambda last, past, prefill, num_new: torch.full_like(last, past) + torch.arange(num_new),
    )
    assert _llava_error(inner_reference) > 1e-4


def test_mutation_masks_sized_without_the_layer_index_are_caught(inner_reference, monkeypatch):
    from transformers.masking_utils import create_causal_mask

    def unsized(decoder, types, layer, embeds, mask, cache):
        return {"full_attention": create_causal_mask(decoder.config, embeds, mask, cache)}

    monkeypatch.setattr(stages_module, "_masks", unsized)
    assert _llava_error(inner_reference) > 1e-4
