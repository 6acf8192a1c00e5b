"""The Reducer base class: budgets, validation, configuration."""

import pytest
import torch

from tokred.core import CALLER_SCORES, Budget, BudgetError, Reducer, Reduction, create_reducer, select_top


class KeepFirst(Reducer):
    """Keep the first tokens (a minimal reducer for tests of the base class)."""

    def reduce(self, tokens, num_keep, *, scores, protected, sizes):
        order = -torch.arange(tokens.shape[1], dtype=torch.float32).expand(tokens.shape[:2])
        return Reduction.from_selection(tokens, select_top(order, num_keep, protected), sizes)


class ScoreKeeper(Reducer):
    """Keep the best-scored tokens."""

    needs_scores = CALLER_SCORES

    def reduce(self, tokens, num_keep, *, scores, protected, sizes):
        return Reduction.from_selection(tokens, select_top(scores, num_keep, protected), sizes)


@pytest.mark.parametrize(
    ("ratio", "num_tokens", "expected"), [(0.5, 7, 4), (0.25, 2, 1), (0.001, 576, 1), (1 / 9, 576, 64), (1.0, 13, 13)]
)
def test_keep_ratio_rounds_half_up_and_keeps_at_least_one(ratio, num_tokens, expected):
    assert Budget(keep_ratio=ratio).resolve(num_tokens) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_keep": 1, "keep_ratio": 0.5}, "exactly one"),
        ({"num_keep": 1, "num_remove": 2}, "exactly one"),
        ({"num_keep": 0}, ">= 1"),
        ({"num_keep": 2.5}, "must be an int"),
        ({"num_keep": True}, "must be an int"),
        ({"keep_ratio": 0}, r"\(0, 1\]"),
        ({"keep_ratio": 1.01}, r"\(0, 1\]"),
        ({"keep_ratio": "half"}, "number"),
    ],
)
def test_bad_budgets_raise_budget_error(kwargs, match):
    with pytest.raises(BudgetError, match=match):
        KeepFirst(**kwargs)


@pytest.mark.parametrize(("num_remove", "num_tokens", "expected"), [(0, 7, 7), (3, 7, 4), (6, 7, 1)])
def test_num_remove_budget(num_remove, num_tokens, expected):
    assert Budget(num_remove=num_remove).resolve(num_tokens) == expected


def test_num_remove_that_leaves_nothing_is_an_error():
    with pytest.raises(BudgetError, match="cannot remove 7 of 7 tokens"):
        Budget(num_remove=7).resolve(7)
    with pytest.raises(BudgetError, match="cannot remove"):
        KeepFirst(num_remove=10)(torch.randn(1, 4, 2))
    with pytest.raises(BudgetError, match="num_remove must be >= 0"):
        KeepFirst(num_remove=-1)


def test_per_call_num_keep_overrides_the_budget():
    tokens = torch.randn(2, 10, 3)
    reducer = KeepFirst(keep_ratio=0.5)
    assert reducer(tokens).num_kept == 5
    assert reducer(tokens, num_keep=3).num_kept == 3
    assert reducer(tokens, num_keep=99).tokens is tokens
    with pytest.raises(BudgetError, match="num_keep must be >= 1"):
        reducer(tokens, num_keep=0)


def test_a_reducer_without_a_budget_needs_one_per_call():
    reducer = KeepFirst()
    assert reducer.budget is None and reducer.num_keep is None and reducer.keep_ratio is None
    assert reducer.config() == {"num_keep": None, "keep_ratio": None, "num_remove": None}
    tokens = torch.randn(2, 10, 3)
    with pytest.raises(BudgetError, match="KeepFirst was built without a budget"):
        reducer(tokens)
    assert reducer(tokens, num_keep=4).indices.tolist() == [[0, 1, 2, 3]] * 2
    with pytest.raises(BudgetError, match="exactly one"):
        Budget()


def test_budget_error_is_a_value_error():
    with pytest.raises(ValueError):
        KeepFirst(num_keep=-1)


def test_num_keep_at_least_n_returns_tokens_unchanged_without_calling_reduce():
    calls = []

    class Spy(KeepFirst):
        def reduce(self, *args, **kwargs):
            calls.append(1)
            return super().reduce(*args, **kwargs)

    tokens = torch.randn(2, 5, 3)
    assert Spy(num_keep=5)(tokens).tokens is tokens
    assert not calls
    Spy(num_keep=4)(tokens)
    assert calls


def test_scores_are_required_and_validated():
    tokens = torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match="needs scores"):
        ScoreKeeper(num_keep=2)(tokens)
    with pytest.raises(ValueError, match="NaN or inf"):
        ScoreKeeper(num_keep=2)(tokens, scores=torch.full((2, 6), float("nan")))
    red = ScoreKeeper(num_keep=2)(tokens, scores=torch.tensor([[0, 5, 1, 6, 0, 0]] * 2).float())
    assert red.indices.tolist() == [[1, 3]] * 2


def test_bad_sizes_and_devices_are_rejected():
    tokens = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="sizes must have shape"):
        KeepFirst(num_keep=2)(tokens, sizes=torch.ones(1, 3))
    with pytest.raises(ValueError, match="finite and positive"):
        KeepFirst(num_keep=2)(tokens, sizes=torch.tensor([[1.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        KeepFirst(num_keep=2)(tokens.tolist())


def test_config_and_repr():
    reducer = create_reducer("uniform", keep_ratio=0.25, merge=True)
    assert reducer.config() == {"num_keep": None, "keep_ratio": 0.25, "num_remove": None, "merge": True}
    assert repr(reducer) == "UniformReducer(keep_ratio=0.25, merge=True)"


def test_a_reducer_returning_the_wrong_count_is_caught():
    class Broken(KeepFirst):
        def reduce(self, tokens, num_keep, **kwargs):
            return super().reduce(tokens, num_keep + 1, **kwargs)

    with pytest.raises(RuntimeError, match="expected"):
        Broken(num_keep=2)(torch.randn(1, 6, 2))
