"""Token reduction inside the models: identity at r = 0, the plan on both streams, the class token, batches."""

import pytest
import torch

from tokred.core import create_reducer
from tokred.core.errors import AttachError, BudgetError, IncompatibleReducerError, InvalidInputError, InvalidTypeError
from tokred.mamba import MTR, ImagePlan, attach, count_flops, create_model
from tokred.mamba.flops import token_counts
from tokred.mamba.scores import delta_importance


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
        with attach(model, "mtr", schedule={i: 0 for i in range(model.depth - 1)}) as handle:
            same = model(x)
        after = model(x)
    assert torch.equal(dense, same)
    assert torch.equal(dense, after), "detach must restore the dense model exactly"
    assert model.token_reduction is None and not handle.attached
    assert handle.last_stats.tokens == (model.num_tokens,) * model.depth


def test_instance_and_name_give_the_same_reduction(model):
    x = images(model)
    with torch.inference_mode():
        with attach(model, "mtr", flops_cut=0.3) as by_name:
            first = model(x)
        with attach(model, MTR(), flops_cut=0.3) as by_instance:
            second = model(x)
    assert torch.equal(first, second)
    assert by_name.schedule == by_instance.schedule and by_name.schedule
    assert isinstance(by_name.reducer, MTR) and by_name.reducer.budget is None


def test_token_counts_follow_the_schedule(model):
    schedule = {0: 3, 1: 2}
    with attach(model, "mtr", schedule=schedule) as handle, torch.inference_mode():
        model(images(model))
    # What each block saw: the count entering that block.
    assert list(handle.last_stats.tokens) == token_counts(model, schedule=schedule)
    assert handle.last_stats.kept == model.num_tokens - 5 and handle.last_stats.batch == 3
    assert count_flops(model, schedule=schedule) < count_flops(model, schedule={})


def test_class_token_is_tracked_and_never_merged(model):
    x = images(model)
    with attach(model, "mtr", r=4, record_plans=True) as handle, torch.inference_mode():
        model(x)
        plans = handle.last_plans
    cls = model.cls_index
    assert [p.image for p in plans] == [0, 1, 2] and all(isinstance(p, ImagePlan) for p in plans)
    for plan in plans:
        plan = plan.reduction
        assert plan.num_tokens == model.num_tokens and plan.num_kept == handle.last_stats.kept
        final_slot = plan.assignment[:, cls]
        assert (final_slot >= 0).all()
        assert (plan.sizes.gather(1, final_slot.unsqueeze(1)) == 1).all(), "nothing may merge into the class token"
        assert (plan.indices.gather(1, final_slot.unsqueeze(1)).squeeze(1) == cls).all()


def test_plans_are_kept_only_when_asked(model):
    with attach(model, "mtr", r=2) as handle, torch.inference_mode():
        model(images(model))
    assert handle.last_plans is None and handle.last_stats is not None


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


def _delta_requests(model):
    """Which blocks were asked for their Δ in each forward, recorded by a pre-hook on every block."""
    asked = []

    def record(module, args, kwargs):
        if kwargs.get("return_delta"):
            asked.append(module)

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in model.layers]
    return asked, hooks


def test_mtr_reads_delta_only_on_scheduled_blocks(model):
    asked, hooks = _delta_requests(model)
    try:
        with attach(model, "mtr", schedule={1: 2}), torch.inference_mode():
            model(images(model))
        assert asked == [model.layers[1]]
        asked.clear()
        with attach(model, "tome", schedule={1: 2}), torch.inference_mode():
            model(images(model))
        assert asked == [], "tome needs no Δ"
    finally:
        for hook in hooks:
            hook.remove()


def test_bad_schedules_and_double_attach_are_refused(model):
    with pytest.raises(InvalidInputError, match="out of range"):
        attach(model, "mtr", schedule={model.depth - 1: 2})
    with pytest.raises(InvalidInputError, match="out of range"):
        attach(model, "mtr", schedule={-1: 2})
    with pytest.raises(BudgetError, match="fewer than two"):
        attach(model, "mtr", schedule={0: model.num_tokens - 1})
    with pytest.raises(InvalidInputError, match="exactly one way"):
        attach(model, "mtr", r=2, flops_cut=0.3)
    with pytest.raises(InvalidInputError, match="exactly one way"):
        attach(model, "mtr")
    with pytest.raises(BudgetError, match="cannot be met"):
        attach(model, "mtr", flops_cut=0.95)
    with attach(model, "mtr", r=1), pytest.raises(AttachError, match="already attached"):
        attach(model, "tome", r=1)
    assert model.token_reduction is None


def test_reducers_that_cannot_run_are_refused_at_attach_time(model):
    with pytest.raises(InvalidTypeError, match=r"reducer instance \(MTR\(\)\) or its registered name \('mtr'\)"):
        attach(model, MTR, flops_cut=0.3)
    with pytest.raises(IncompatibleReducerError, match=r"MTR\(num_keep=5.*has a budget.*build it without one"):
        attach(model, MTR(num_keep=5), flops_cut=0.3)
    with pytest.raises(IncompatibleReducerError, match=r"num_keep= has no effect here"):
        attach(model, "mtr", flops_cut=0.3, num_keep=5)
    with pytest.raises(IncompatibleReducerError, match=r"'caller' scores, which a Vision Mamba model cannot supply"):
        attach(model, "topk", flops_cut=0.3)
    with pytest.raises(InvalidTypeError, match="go with a reducer given by name"):
        attach(model, MTR(), flops_cut=0.3, target_ratio=0.5)
    with pytest.raises(InvalidTypeError, match="tokred-mamba model"):
        attach(torch.nn.Linear(2, 2), "mtr", r=1)
    assert model.token_reduction is None
    with attach(model, "mtr", flops_cut=0.3, target_ratio=0.5) as handle:
        assert handle.reducer.target_ratio == 0.5


def test_hook_matches_a_step_by_step_reference(model):
    """The reduced forward written out by hand, one image at a time, with the reducer called directly."""
    x = images(model, batch=2, seed=3)
    schedule = {0: 2, 2: 3}
    reducer = MTR()
    expected = []
    with torch.inference_mode():
        for row in range(2):
            hidden, residual, sizes, cls = model.embed(x[row : row + 1]), None, None, model.cls_index
            for index, layer in enumerate(model.layers):
                hidden, residual, delta = layer(hidden, residual, return_delta=True)
                if index in schedule:
                    protected = torch.zeros(hidden.shape[:2], dtype=torch.bool)
                    protected[0, cls] = True
                    step = reducer(
                        hidden,
                        scores=delta_importance(delta),
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
