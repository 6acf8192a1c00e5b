"""The demo's speed measurements, on tiny models of the same kinds (the real shapes take tens of seconds)."""

from statistics import median

import pytest
import torch

from tokred.bench.speed import SpeedResult, llava_prefill_speedup, vim_forward_speedup
from tokred.mamba import attach, create_model
from tokred.mamba.flops import token_counts
from tokred.vlm.testing import tiny_model

TINY_VIM = {"img_size": 32, "embed_dim": 32, "depth": 8}


def test_the_vim_forward_is_timed_dense_and_at_the_cut():
    result = vim_forward_speedup(flops_cut=0.2, batch=2, repeats=2, model_overrides=TINY_VIM)
    model = create_model("vim_small", **TINY_VIM)
    with attach(model, "mtr", flops_cut=0.2) as handle:
        counts = token_counts(model, schedule=handle.schedule)
    assert result.tokens == (counts[0], counts[-1]) and counts[-1] < counts[0]
    assert result.label == "random weights, Vim-S shapes" and "2 images at 32 px" in result.what
    assert result.dense_ms > 0 and result.reduced_ms > 0 and result.speedup > 0
    assert result.line().startswith("speed (random weights, Vim-S shapes): one forward of 2 images")


def test_the_llava_prefill_is_timed_dense_and_reduced():
    model = tiny_model("llava", attn_implementation="sdpa")
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    result = llava_prefill_speedup(keep=2, text_tokens=6, repeats=2, model=model)
    assert result.tokens == (side * side, 2)
    assert result.method == f"ApET {side * side} → 2 visual tokens"
    assert f"{side * side + 6} tokens" in result.what
    assert result.dense_ms > 0 and result.reduced_ms > 0
    assert getattr(model, "_tokred_vlm_attachment", None) is None  # detached after the timing
    for parameter in model.parameters():
        assert torch.isfinite(parameter).all()


def test_a_result_reads_as_one_line():
    result = SpeedResult("random weights, X shapes", "one call", 10.0, 4.0, 2.5, (100, 10), "R 100 → 10")
    assert result.line() == "speed (random weights, X shapes): one call, dense 10 ms, R 100 → 10 4 ms: 2.50x faster"


@pytest.mark.parametrize("repeats", [1, 2, 3])
def test_the_speedup_is_the_median_of_paired_ratios(repeats, monkeypatch):
    from tokred.bench import speed

    now = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: now[0])
    durations = {"dense": iter([4.0, 9.0, 5.0]), "reduced": iter([2.0, 3.0, 1.0])}

    def call(name):
        def run():
            now[0] += next(durations[name])

        return run

    dense_s, reduced_s, ratio = speed._paired(call("dense"), call("reduced"), repeats)
    dense, reduced = [4.0, 9.0, 5.0][:repeats], [2.0, 3.0, 1.0][:repeats]
    # The order alternates (dense first, then reduced first, ...), yet each round pairs its own two calls.
    assert (dense_s, reduced_s) == (median(dense), median(reduced))
    assert ratio == pytest.approx(median(d / r for d, r in zip(dense, reduced, strict=True)))


def test_random_weights_are_seeded_at_a_real_scale_with_unit_norms_and_zero_biases():
    from tokred.bench.speed import fill_random_weights

    first = fill_random_weights(tiny_model("llava"), seed=3, std=0.05)
    again = fill_random_weights(tiny_model("llava"), seed=3, std=0.05)
    other = fill_random_weights(tiny_model("llava"), seed=4, std=0.05)
    weights = []
    for (name, parameter), (_, twin), (_, different) in zip(
        first.named_parameters(), again.named_parameters(), other.named_parameters(), strict=True
    ):
        assert torch.equal(parameter, twin), name
        if name.endswith("bias"):
            assert not parameter.any(), name
        elif "norm" in name.split(".")[-2]:
            assert (parameter == 1).all(), name
        else:
            assert not torch.equal(parameter, different), name
            if parameter.numel() >= 1000:
                assert parameter.std().item() == pytest.approx(0.05, rel=0.1), name
            weights.append(parameter.detach().flatten()[:64])
    # Each weight starts at its own offset of the pool, so no two are the same values.
    assert len({tuple(w.tolist()) for w in weights}) == len(weights)


def test_a_weight_longer_than_the_pool_repeats_it():
    from tokred.bench import speed

    layer = torch.nn.Linear(speed._POOL // 1000 + 1, 1000, bias=False)
    speed.fill_random_weights(layer, seed=0)
    flat = layer.weight.detach().flatten()
    assert flat.numel() > speed._POOL
    assert torch.equal(flat[speed._POOL :], flat[: flat.numel() - speed._POOL])
    assert torch.isfinite(flat).all() and flat[: speed._POOL].unique().numel() > speed._POOL * 0.99
