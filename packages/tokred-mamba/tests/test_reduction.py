"""Token reduction inside the models: identity at r = 0, the plan on both streams, the class token, batches."""

import pytest
import torch

from tokred.core import create_reducer
from tokred.mamba import attach, count_flops, create_model
from tokred.mamba.flops import token_counts


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vim_test").eval()


def images(model, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, model.img_size, model.img_size, generator=gen)


def test_r_zero_is_bit_identical_to_the_dense_model(model):
    x = images(model)
    with torch.inference_mode():
        dense = model(x)
        with attach(model, "mtr", schedule={i: 0 for i in range(model.depth - 1)}):
            same = model(x)
        after = model(x)
    assert torch.equal(dense, same)
    assert torch.equal(dense, after), "detach must restore the dense model exactly"
    assert model.token_reduction is None
    assert not any(layer.mixer.record_delta for layer in model.layers)


def test_token_counts_follow_the_schedule(model):
    lengths = []
    schedule = {0: 3, 1: 2}
    with attach(model, "mtr", schedule=schedule) as handle:
        inner = handle.hook

        def spy(index, block, hidden, residual, cls_pos):
            lengths.append(hidden.shape[1])
            return inner(index, block, hidden, residual, cls_pos)

        model.token_reduction = spy
        with torch.inference_mode():
            model(images(model))
        model.token_reduction = inner
    expected = token_counts(model, schedule=schedule)
    # The hook sees each block's output, i.e. the count entering that block.
    assert lengths == expected
    assert count_flops(model, schedule=schedule) < count_flops(model, schedule={})


def test_class_token_is_tracked_and_never_merged(model):
    x = images(model)
    with attach(model, "mtr", r=4, track=True) as handle, torch.inference_mode():
        model(x)
        plan = handle.last_plan
    cls = model.cls_index
    assert plan is not None and plan.num_tokens == model.num_tokens
    final_slot = plan.assignment[:, cls]
    assert (final_slot >= 0).all()
    assert (plan.sizes.gather(1, final_slot.unsqueeze(1)) == 1).all(), "nothing may merge into the class token"
    assert (plan.indices.gather(1, final_slot.unsqueeze(1)).squeeze(1) == cls).all()


def test_reduced_batch_equals_per_sample_runs(model):
    x = images(model, batch=3, seed=1)
    with attach(model, "mtr", r=3), torch.inference_mode():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mtr", "topvim", "utr", "tome", "norm", "uniform", "divprune", "random"])
def test_every_reducer_runs_through_the_same_hook(model, name):
    x = images(model, batch=2)
    config = {"seed": 0} if create_reducer(name, num_keep=1).stochastic else {}
    with attach(model, name, r=3, **config) as handle, torch.inference_mode():
        logits = model(x)
        flops = count_flops(model)
    assert logits.shape == (2, model.num_classes) and torch.isfinite(logits).all()
    assert flops == count_flops(model, schedule=handle.schedule)


def test_mtr_reads_delta_only_on_scheduled_blocks(model):
    with attach(model, "mtr", schedule={1: 2}):
        flags = [layer.mixer.record_delta for layer in model.layers]
    assert flags == [index == 1 for index in range(model.depth)]
    with attach(model, "tome", schedule={1: 2}):
        assert not any(layer.mixer.record_delta for layer in model.layers), "tome needs no Δ"


def test_bad_schedules_and_double_attach_are_refused(model):
    with pytest.raises(ValueError, match="out of range"):
        attach(model, "mtr", schedule={model.depth - 1: 2})
    with pytest.raises(ValueError, match="out of range"):
        attach(model, "mtr", schedule={-1: 2})
    with pytest.raises(ValueError, match="fewer than two"):
        attach(model, "mtr", schedule={0: model.num_tokens - 1})
    with pytest.raises(ValueError, match="exactly one way"):
        attach(model, "mtr", r=2, flops_cut=0.3)
    with pytest.raises(ValueError, match="exactly one way"):
        attach(model, "mtr")
    with attach(model, "mtr", r=1), pytest.raises(RuntimeError, match="already attached"):
        attach(model, "tome", r=1)
    assert model.token_reduction is None


def test_hook_matches_a_step_by_step_reference(model):
    """The reduced forward written out by hand, one image at a time, with the reducer called directly."""
    from tokred.mamba.methods import MTR

    x = images(model, batch=2, seed=3)
    schedule = {0: 2, 2: 3}
    reducer = MTR(num_remove=1)
    expected = []
    with torch.inference_mode():
        for row in range(2):
            hidden, residual, sizes, cls = model.embed(x[row : row + 1]), None, None, model.cls_index
            for index, layer in enumerate(model.layers):
                layer.mixer.record_delta = index in schedule
                hidden, residual = layer(hidden, residual)
                layer.mixer.record_delta = False
                if index in schedule:
                    protected = torch.zeros(hidden.shape[:2], dtype=torch.bool)
                    protected[0, cls] = True
                    step = reducer(
                        hidden,
                        scores=reducer.scores_from_block(layer),
                        protected=protected,
                        sizes=sizes,
                        num_keep=hidden.shape[1] - schedule[index],
                    )
                    hidden, residual, sizes = step.tokens, step.apply(residual), step.sizes
                    cls = int(step.assignment[0, cls])  # the slot the class token went to
            features = model.norm_f(residual + hidden)[0, cls]
            expected.append(model.forward_head(features.unsqueeze(0)))
        with attach(model, reducer, schedule=schedule):
            actual = model(x)
    torch.testing.assert_close(actual, torch.cat(expected), rtol=1e-4, atol=1e-5)
