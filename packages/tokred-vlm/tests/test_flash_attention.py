"""attach() under ``attn_implementation="flash_attention_2"``.

Without a GPU the flash-attn kernels cannot run, so the first tests drive transformers' real FlashAttention-2
code path (mask handling, unpadding, packed-sequence detection, the varlen call) with a pure-PyTorch stand-in
for the two kernels, written from flash-attn's documented semantics (causal masks aligned bottom-right). The
last test runs the real kernels against sdpa when CUDA and flash-attn are present.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers.modeling_flash_attention_utils as fa_utils

from tokred.core import create_reducer
from tokred.vlm import attach
from tokred.vlm.testing import Image, Video, tiny_inputs, tiny_model

ROWS = {
    "llava": [[3, Image(), 4], [2, Image(), 3, Image(), 2]],
    "qwen2_vl": [[3, Image(56, 84), 4], [2, Image(56, 56), 3, Video(4, 56, 56), 2]],
}
STEPS = 4


def _attention(q, k, v, *, causal, scale):
    """One sequence: q (Lq, H, D), k/v (Lk, Hk, D) -> (Lq, H, D)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.stack([_attention(a, b, c, causal=causal, scale=scale) for a, b, c in zip(q, k, v, strict=True)])


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    deterministic=False,
    **_,
):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    # The real kernels read out of bounds where these disagree; Python slicing would clamp silently.
    assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0], "cu_seqlens disagree"
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        out[qs:qe] = _attention(q[qs:qe], k[ks:ke], v[ks:ke], causal=causal, scale=scale)
    return out


@pytest.fixture
def simulated_flash(monkeypatch):
    """Route transformers' flash_attention_2 path to the stand-in kernels; checks they were really called."""
    calls = {"dense": 0, "varlen": 0}

    def dense(*args, **kwargs):
        calls["dense"] += 1
        return flash_attn_func(*args, **kwargs)

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, **kwargs):
        calls["varlen"] += 1
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)

    monkeypatch.setattr(
        fa_utils, "_lazy_imports", lambda *a, **k: (dense, varlen, None, fa_utils._pad_input, fa_utils._unpad_input)
    )
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    yield calls
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    assert calls["dense"] + calls["varlen"] > 0, "the flash_attention_2 path was never taken"


def _with_flash(model):
    """The decoder switched to flash_attention_2 (the check for the flash-attn package is bypassed)."""
    model.config.text_config._attn_implementation = "flash_attention_2"
    return model


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )


@pytest.mark.parametrize("family", list(ROWS))
def test_stand_in_kernels_agree_with_sdpa_on_the_unmodified_model(simulated_flash, family):
    """The stand-in is faithful: without tokred, flash_attention_2 gives sdpa's logits."""
    sdpa = tiny_model(family, attn_implementation="sdpa")
    flash = _with_flash(tiny_model(family, attn_implementation="sdpa"))
    inputs = tiny_inputs(sdpa, ROWS[family])
    for a, b in zip(_generate(flash, inputs).logits, _generate(sdpa, inputs).logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(ROWS))
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_reduced_generate_under_flash_attention_matches_sdpa(simulated_flash, family, positions):
    sdpa = tiny_model(family, attn_implementation="sdpa")
    flash = _with_flash(tiny_model(family, attn_implementation="sdpa"))
    reducer = create_reducer("tome", keep_ratio=0.5)
    for rows in (ROWS[family], ROWS[family][:1]):  # a left-padded batch, and one unpadded row (packed detection)
        inputs = tiny_inputs(sdpa, rows)
        with attach(sdpa, reducer, space="llm", positions=positions):
            want = _generate(sdpa, inputs)
        with attach(flash, reducer, space="llm", positions=positions) as handle:
            got = _generate(flash, inputs)
            assert handle.last_stats.reduced_length < handle.last_stats.original_length
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(ROWS))
def test_an_inner_stage_under_flash_attention_matches_sdpa(simulated_flash, family):
    sdpa = tiny_model(family, attn_implementation="sdpa", decoder_layers=4)
    flash = _with_flash(tiny_model(family, attn_implementation="sdpa", decoder_layers=4))
    stages = {2: create_reducer("apet", keep_ratio=0.5, num_basis=2)}
    for rows in (ROWS[family], ROWS[family][:1]):  # at batch 1, flash reads packing off the short positions
        inputs = tiny_inputs(sdpa, rows)
        with attach(sdpa, create_reducer("tome", keep_ratio=0.75), space="llm", layers=stages):
            want = _generate(sdpa, inputs)
        with attach(flash, create_reducer("tome", keep_ratio=0.75), space="llm", layers=stages) as handle:
            got = _generate(flash, inputs)
            assert handle.last_stats.stages[0].length < handle.last_stats.reduced_length
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(ROWS))
def test_keep_all_under_flash_attention_is_identical(simulated_flash, family):
    flash = _with_flash(tiny_model(family, attn_implementation="sdpa"))
    inputs = tiny_inputs(flash, ROWS[family])
    expected = _generate(flash, inputs)
    with attach(flash, create_reducer("norm", num_keep=10_000)):
        got = _generate(flash, inputs)
    for a, b in zip(got.logits, expected.logits, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA device and the flash-attn package (tokred-vlm[flash])",
)
@pytest.mark.parametrize("family", list(ROWS))
def test_real_flash_attention_kernels_match_sdpa_on_gpu(family):
    reducer = create_reducer("apet", num_keep=4)
    results = {}
    for attn in ("sdpa", "flash_attention_2"):
        model = tiny_model(family, attn_implementation=attn, dtype=torch.bfloat16).cuda()
        inputs = tiny_inputs(model, ROWS[family])
        with attach(model, reducer):
            results[attn] = _generate(model, inputs)
    for a, b in zip(results["flash_attention_2"].logits, results["sdpa"].logits, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
