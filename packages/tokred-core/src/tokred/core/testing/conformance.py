"""`ReducerConformance`: the contract every tokred reducer is tested against.

Subclass it in a test module, name the reducer, and pytest collects every check:

```python
from tokred.core.testing import ReducerConformance

class TestMyReducer(ReducerConformance):
    reducer_name = "my_reducer"          # as registered
    reducer_kwargs = {"alpha": 0.5}      # hyper-parameters besides the budget
```

The checks cover what every caller of a reducer relies on: registration and configuration round-trip,
shapes and dtypes, the budget (``num_keep`` and ``keep_ratio``), ascending indices, a consistent plan,
protected tokens kept unchanged, keep-all identity, determinism (under a seed for stochastic reducers),
batch independence, dtype and device preservation, inputs left unmodified, rank-deficient inputs, and
clear errors on bad input.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from tokred.core.errors import BudgetError, InvalidInputError, InvalidTypeError
from tokred.core.reducer import Reducer
from tokred.core.reduction import Reduction
from tokred.core.registry import available_reducers, create_reducer, get_reducer_class

__all__ = ["ReducerConformance", "make_tokens"]


def make_tokens(
    batch: int = 3,
    num_tokens: int = 24,
    channels: int = 16,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Clustered random tokens of shape ``(B, N, C)``: a few centres plus noise and a spread of norms.

    Clusters give merging reducers real near-duplicates to find; varied norms give norm-based ones something
    to rank. Deterministic for a given ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    num_centres = max(2, num_tokens // 6)
    centres = torch.randn(batch, num_centres, channels, generator=gen) * 2.0
    which = torch.randint(0, num_centres, (batch, num_tokens), generator=gen)
    tokens = centres.gather(1, which.unsqueeze(-1).expand(-1, -1, channels))
    tokens = tokens + 0.3 * torch.randn(batch, num_tokens, channels, generator=gen)
    tokens = tokens * (0.5 + torch.rand(batch, num_tokens, 1, generator=gen))
    return tokens.to(device=device, dtype=dtype)


def _random_protected(batch: int, num_tokens: int, max_count: int, seed: int = 1) -> torch.Tensor:
    """A protected mask with a different number (1..max_count) of protected tokens in each row."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool)
    for row in range(batch):
        count = 1 + row % max_count
        mask[row, torch.randperm(num_tokens, generator=gen)[:count]] = True
    return mask


class ReducerConformance:
    """Base class of the conformance tests; subclass it and set ``reducer_name``.

    Attributes:
        reducer_name: Registry name of the reducer under test.
        reducer_kwargs: Constructor arguments besides the budget (include ``seed`` for stochastic reducers).
        reproduces_tokens: Whether ``reduction.apply(tokens)`` equals ``reduction.tokens``, i.e. the plan fully
            describes the output. True for every reducer whose slots are weighted means of input tokens.
        batch_size: ``B`` of the test inputs.
        num_tokens: ``N`` of the test inputs.
        channels: ``C`` of the test inputs.
        atol: Absolute tolerance for fp32 comparisons.
    """

    reducer_name: ClassVar[str] = ""
    reducer_kwargs: ClassVar[dict[str, Any]] = {}
    reproduces_tokens: ClassVar[bool] = True
    batch_size: ClassVar[int] = 3
    num_tokens: ClassVar[int] = 24
    channels: ClassVar[int] = 16
    atol: ClassVar[float] = 1e-5

    # -- helpers -------------------------------------------------------------------------------------------

    def make_reducer(self, **budget: Any) -> Reducer:
        """Create the reducer under test with ``reducer_kwargs`` and the given budget."""
        if not budget:
            budget = {"num_keep": self.num_tokens // 3}
        return create_reducer(self.reducer_name, **{**self.reducer_kwargs, **budget})

    def make_inputs(self, tokens: torch.Tensor) -> dict[str, Any]:
        """Extra call arguments for ``tokens``: external scores when the reducer uses them."""
        cls = get_reducer_class(self.reducer_name)
        if cls.needs_scores is not None:
            gen = torch.Generator().manual_seed(7)
            return {"scores": torch.rand(tokens.shape[:2], generator=gen).to(tokens.device)}
        return {}

    def run(self, tokens: torch.Tensor, **kwargs: Any) -> Reduction:
        """Reduce ``tokens`` with a fresh reducer; ``kwargs`` may hold a budget and call arguments."""
        budget = {k: kwargs.pop(k) for k in ("num_keep", "keep_ratio", "num_remove") if k in kwargs}
        return self.make_reducer(**budget)(tokens, **{**self.make_inputs(tokens), **kwargs})

    def tokens(self, **kwargs: Any) -> torch.Tensor:
        """The default test tokens ``(batch_size, num_tokens, channels)``."""
        return make_tokens(self.batch_size, self.num_tokens, self.channels, **kwargs)

    def check_plan(
        self, tokens: torch.Tensor, red: Reduction, num_keep: int, sizes: torch.Tensor | None = None
    ) -> None:
        """Assert the structural invariants of a reduction of ``tokens`` (of ``sizes``) to ``num_keep`` tokens."""
        batch, num_tokens, channels = tokens.shape
        assert red.tokens.shape == (batch, num_keep, channels)
        assert red.tokens.dtype == tokens.dtype and red.tokens.device == tokens.device
        assert red.indices.shape == (batch, num_keep) and red.indices.dtype == torch.long
        assert red.sizes.shape == (batch, num_keep)
        assert red.assignment.shape == (batch, num_tokens) and red.assignment.dtype == torch.long
        assert red.weights.shape == (batch, num_tokens)
        assert bool(torch.isfinite(red.tokens).all())
        assert bool((red.indices >= 0).all()) and bool((red.indices < num_tokens).all())
        if num_keep > 1:
            assert bool((red.indices[:, 1:] > red.indices[:, :-1]).all()), "indices must be strictly ascending"
        assert bool((red.assignment >= -1).all()) and bool((red.assignment < num_keep).all())
        assert bool((red.weights >= 0).all())
        assert bool((red.weights[red.assignment < 0] == 0).all()), "dropped tokens must have weight 0"
        assert bool((red.sizes >= 1 - 1e-6).all()), "every slot represents at least one original token"
        total = torch.full((batch,), float(num_tokens)) if sizes is None else sizes.float().sum(dim=1)
        assert bool((red.sizes.float().sum(dim=1).cpu() <= total + 1e-4).all()), "slots carry more than the input"
        occupied = torch.zeros(batch, num_keep).scatter_add_(
            1, red.assignment.clamp_min(0).cpu(), red.weights.float().cpu()
        )
        torch.testing.assert_close(occupied, torch.ones(batch, num_keep), atol=1e-5, rtol=0)
        if self.reproduces_tokens:
            torch.testing.assert_close(
                red.apply(tokens).float(), red.tokens.float(), atol=self._tol(tokens), rtol=self._tol(tokens)
            )

    def _tol(self, tokens: torch.Tensor) -> float:
        return {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(tokens.dtype, self.atol)

    # -- the checks ----------------------------------------------------------------------------------------

    def test_registered_and_documented(self) -> None:
        """The name is registered, maps to a Reducer subclass and the class has a docstring."""
        assert self.reducer_name in available_reducers()
        cls = get_reducer_class(self.reducer_name)
        assert issubclass(cls, Reducer)
        assert cls.name == self.reducer_name
        assert (cls.__doc__ or "").strip(), f"{cls.__name__} needs a docstring: its first line is the listing"

    def test_config_round_trip(self) -> None:
        """``create_reducer(name, **reducer.config())`` rebuilds an equal reducer."""
        reducer = self.make_reducer(num_keep=5)
        config = reducer.config()
        assert config["num_keep"] == 5 and config["keep_ratio"] is None and config["num_remove"] is None
        rebuilt = create_reducer(self.reducer_name, **config)
        assert rebuilt.config() == config
        assert repr(reducer).startswith(f"{type(reducer).__name__}(")

    @pytest.mark.parametrize("num_keep", [1, 2, 7, 23])
    def test_num_keep_budget(self, num_keep: int) -> None:
        """A ``num_keep`` budget gives exactly that many tokens and a consistent plan."""
        tokens = self.tokens()
        red = self.run(tokens, num_keep=num_keep)
        self.check_plan(tokens, red, num_keep)

    @pytest.mark.parametrize(("keep_ratio", "expected"), [(0.25, 6), (0.5, 12), (0.01, 1)])
    def test_keep_ratio_budget(self, keep_ratio: float, expected: int) -> None:
        """A ``keep_ratio`` budget rounds half up and keeps at least one token."""
        tokens = self.tokens()
        red = self.run(tokens, keep_ratio=keep_ratio)
        self.check_plan(tokens, red, expected)

    @pytest.mark.parametrize(("num_remove", "expected"), [(1, 23), (10, 14), (23, 1)])
    def test_num_remove_budget(self, num_remove: int, expected: int) -> None:
        """A ``num_remove`` budget removes exactly that many tokens."""
        tokens = self.tokens()
        red = self.run(tokens, num_remove=num_remove)
        self.check_plan(tokens, red, expected)

    def test_per_call_budget_override(self) -> None:
        """``reducer(tokens, num_keep=K)`` keeps ``K`` whatever the reducer's own budget."""
        tokens = self.tokens()
        red = self.make_reducer(keep_ratio=0.5)(tokens, num_keep=5, **self.make_inputs(tokens))
        self.check_plan(tokens, red, 5)

    @pytest.mark.parametrize("budget", [{"num_keep": 24}, {"num_keep": 1000}, {"keep_ratio": 1.0}, {"num_remove": 0}])
    def test_keep_all_is_identity(self, budget: dict[str, Any]) -> None:
        """A budget of at least N returns every token unchanged."""
        tokens = self.tokens()
        red = self.run(tokens, **budget)
        assert torch.equal(red.tokens, tokens)
        assert torch.equal(red.indices, torch.arange(self.num_tokens).expand(self.batch_size, -1))
        assert torch.equal(red.assignment, red.indices)
        assert bool((red.sizes == 1).all())

    def test_protected_tokens_survive_unchanged(self) -> None:
        """Protected tokens (a different number per row) are kept unmodified, nothing merged in."""
        tokens = self.tokens()
        protected = _random_protected(self.batch_size, self.num_tokens, max_count=4)
        num_keep = 6
        red = self.run(tokens, num_keep=num_keep, protected=protected)
        self.check_plan(tokens, red, num_keep)
        for row in range(self.batch_size):
            kept = red.indices[row].tolist()
            for pos in protected[row].nonzero().flatten().tolist():
                assert pos in kept, f"protected token {pos} of row {row} was not kept"
                slot = kept.index(pos)
                assert torch.equal(red.tokens[row, slot], tokens[row, pos]), "a protected token was modified"
                assert red.sizes[row, slot] == 1, "something was merged into a protected token"

    def test_protected_filling_the_budget(self) -> None:
        """When protected tokens fill the whole budget, exactly they survive."""
        tokens = self.tokens()
        protected = torch.zeros(self.batch_size, self.num_tokens, dtype=torch.bool)
        protected[:, [0, 5, 9]] = True
        red = self.run(tokens, num_keep=3, protected=protected)
        assert torch.equal(red.indices, torch.tensor([[0, 5, 9]]).expand(self.batch_size, -1))
        assert torch.equal(red.tokens, tokens[:, [0, 5, 9]])

    def test_more_protected_than_budget_is_an_error(self) -> None:
        """More protected tokens than the budget raises `BudgetError`."""
        tokens = self.tokens()
        protected = torch.zeros(self.batch_size, self.num_tokens, dtype=torch.bool)
        protected[:, :5] = True
        with pytest.raises(BudgetError, match="protected"):
            self.run(tokens, num_keep=4, protected=protected)

    def test_deterministic(self) -> None:
        """Two calls on the same input give the same result."""
        tokens = self.tokens()
        first, second = self.run(tokens), self.run(tokens)
        assert torch.equal(first.indices, second.indices)
        assert torch.equal(first.tokens, second.tokens)
        assert torch.equal(first.assignment, second.assignment)

    def test_global_rng_and_seed(self) -> None:
        # Deterministic reducers ignore the global RNG; stochastic ones follow their own seed.
        """Deterministic reducers ignore the global RNG; stochastic ones follow their own seed."""
        tokens = self.tokens()
        cls = get_reducer_class(self.reducer_name)
        if cls.stochastic:
            base = {**self.reducer_kwargs, "num_keep": 8}
            runs = [create_reducer(self.reducer_name, **{**base, "seed": s})(tokens).indices for s in range(4)]
            assert any(not torch.equal(runs[0], other) for other in runs[1:]), "the seed has no effect"
            torch.manual_seed(0)
            first = self.run(tokens)
            torch.manual_seed(1)
            assert torch.equal(first.indices, self.run(tokens).indices), "a seeded reducer used the global RNG"
        else:
            torch.manual_seed(0)
            first = self.run(tokens)
            torch.manual_seed(1)
            assert torch.equal(first.indices, self.run(tokens).indices)

    def test_batch_independence(self) -> None:
        """A row's result does not depend on the other rows of the batch."""
        tokens = self.tokens()
        protected = _random_protected(self.batch_size, self.num_tokens, max_count=3)
        inputs = self.make_inputs(tokens)
        batched = self.make_reducer(num_keep=7)(tokens, protected=protected, **inputs)
        if get_reducer_class(self.reducer_name).stochastic:
            # Draws are per row from one generator, so compare against the same batch with the other rows
            # replaced: row 0 must not notice.
            other = tokens.clone()
            other[1:] = make_tokens(self.batch_size - 1, self.num_tokens, self.channels, seed=99)
            changed = self.make_reducer(num_keep=7)(other, protected=protected, **inputs)
            assert torch.equal(changed.indices[0], batched.indices[0])
            assert torch.equal(changed.tokens[0], batched.tokens[0])
            return
        for row in range(self.batch_size):
            row_inputs = {k: v[row : row + 1] for k, v in inputs.items()}
            alone = self.make_reducer(num_keep=7)(
                tokens[row : row + 1], protected=protected[row : row + 1], **row_inputs
            )
            assert torch.equal(alone.indices[0], batched.indices[row])
            assert torch.equal(alone.assignment[0], batched.assignment[row])
            torch.testing.assert_close(alone.tokens[0], batched.tokens[row], atol=self.atol, rtol=self.atol)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
    def test_dtype_preserved(self, dtype: torch.dtype) -> None:
        """Half and double precision inputs come back in their own dtype."""
        tokens = self.tokens(dtype=dtype)
        red = self.run(tokens, num_keep=6)
        self.check_plan(tokens, red, 6)

    def test_sizes_accumulate(self) -> None:
        """Output sizes add up the input sizes of every token that was not dropped."""
        tokens = self.tokens()
        sizes = torch.randint(1, 4, (self.batch_size, self.num_tokens)).float()
        red = self.run(tokens, num_keep=8, sizes=sizes)
        self.check_plan(tokens, red, 8, sizes)
        carried = (sizes * (red.assignment >= 0)).sum(dim=1)
        torch.testing.assert_close(red.sizes.sum(dim=1), carried)

    def test_inputs_not_modified(self) -> None:
        """The call leaves tokens, protected, sizes and scores untouched."""
        tokens = self.tokens()
        protected = _random_protected(self.batch_size, self.num_tokens, max_count=2)
        sizes = torch.ones(self.batch_size, self.num_tokens) * 2
        inputs = self.make_inputs(tokens)
        snapshot = [t.clone() for t in (tokens, protected, sizes, *inputs.values())]
        self.make_reducer(num_keep=5)(tokens, protected=protected, sizes=sizes, **inputs)
        for before, after in zip(snapshot, (tokens, protected, sizes, *inputs.values()), strict=True):
            assert torch.equal(before, after)

    @pytest.mark.parametrize("distinct", [1, 2, 5])
    def test_rank_deficient_tokens(self, distinct: int) -> None:
        """Repeated tokens (1, 2 or 5 distinct ones) do not crash and give a valid plan."""
        base = self.tokens()[:, :distinct]
        tokens = base.repeat(1, -(-self.num_tokens // distinct), 1)[:, : self.num_tokens].contiguous()
        red = self.run(tokens, num_keep=8)
        self.check_plan(tokens, red, 8)

    def test_zero_tokens_and_tiny_sets(self) -> None:
        """All-zero tokens and a single-token set are handled."""
        tokens = torch.zeros(2, 3, 4)
        red = self.run(tokens, num_keep=2)
        self.check_plan(tokens, red, 2)
        single = self.tokens()[:, :1]
        assert torch.equal(self.run(single, num_keep=1).tokens, single)

    def test_device_preserved_on_cuda(self) -> None:
        """On a CUDA device every output stays on it (skipped without one)."""
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device on this machine")
        tokens = self.tokens(device="cuda")
        red = self.run(tokens, num_keep=6)
        self.check_plan(tokens, red, 6)
        assert red.indices.device.type == "cuda" and red.assignment.device.type == "cuda"

    @pytest.mark.parametrize(
        ("make_bad", "error", "match"),
        [
            (lambda t: t[0], InvalidInputError, r"shape \(B, N, C\)"),
            (lambda t: t[:, :0], InvalidInputError, "empty"),
            (
                lambda t: t.masked_fill(
                    torch.zeros_like(t, dtype=torch.bool).index_fill_(1, torch.tensor([3]), True), float("nan")
                ),
                InvalidInputError,
                "NaN",
            ),
            (lambda t: t.clone().index_fill_(2, torch.tensor([1]), float("inf")), InvalidInputError, "inf"),
            (lambda t: t.long(), InvalidTypeError, "floating"),
        ],
        ids=["2d", "empty", "nan", "inf", "integer"],
    )
    def test_bad_tokens_are_rejected(self, make_bad: Any, error: type[Exception], match: str) -> None:
        """Malformed tokens (wrong rank, empty, NaN, inf, integer) raise a clear error."""
        with pytest.raises(error, match=match):
            self.run(make_bad(self.tokens()), num_keep=4)

    def test_bad_protected_is_rejected(self) -> None:
        """A protected mask of the wrong shape or dtype raises a clear error."""
        tokens = self.tokens()
        with pytest.raises(InvalidInputError, match="protected must have shape"):
            self.run(tokens, num_keep=4, protected=torch.zeros(self.batch_size, 5, dtype=torch.bool))
        with pytest.raises(InvalidTypeError, match="bool"):
            self.run(tokens, num_keep=4, protected=torch.zeros(self.batch_size, self.num_tokens))

    def test_bad_scores_are_rejected(self) -> None:
        """Scores of the wrong shape, or scores the reducer would ignore, raise a clear error."""
        tokens = self.tokens()
        cls = get_reducer_class(self.reducer_name)
        if cls.needs_scores is not None:
            with pytest.raises(InvalidInputError, match="scores must have shape"):
                self.run(tokens, num_keep=4, scores=torch.zeros(self.batch_size, 3))
            reducer = self.make_reducer(num_keep=4)
            with pytest.raises(InvalidInputError, match="needs scores"):
                reducer(tokens)
        else:
            with pytest.raises(InvalidInputError, match="features alone"):
                self.run(tokens, num_keep=4, scores=torch.zeros(self.batch_size, self.num_tokens))

    @pytest.mark.parametrize(
        "budget",
        [
            {"num_keep": 0},
            {"num_keep": -3},
            {"keep_ratio": 0.0},
            {"keep_ratio": 1.5},
            {"num_remove": -1},
            {"num_keep": 4, "keep_ratio": 0.5},
        ],
        ids=["zero", "negative", "ratio0", "ratio>1", "remove<0", "both"],
    )
    def test_bad_budget_is_rejected(self, budget: dict[str, Any]) -> None:
        """Invalid budgets raise `BudgetError` at construction."""
        with pytest.raises(BudgetError):
            create_reducer(self.reducer_name, **{**self.reducer_kwargs, **budget})

    def test_without_a_budget_the_call_gives_the_count(self) -> None:
        """Built without a budget (for a model's schedule), it keeps the per-call ``num_keep`` and refuses none."""
        tokens = self.tokens()
        unbudgeted = create_reducer(self.reducer_name, **self.reducer_kwargs)
        assert unbudgeted.budget is None
        with pytest.raises(BudgetError, match="without a budget"):
            unbudgeted(tokens, **self.make_inputs(tokens))
        reduced = unbudgeted(tokens, num_keep=5, **self.make_inputs(tokens))
        self.check_plan(tokens, reduced, 5)
        budgeted = self.make_reducer(num_keep=5)(tokens, **self.make_inputs(tokens))
        if not get_reducer_class(self.reducer_name).stochastic or "seed" in self.reducer_kwargs:
            torch.testing.assert_close(reduced.tokens, budgeted.tokens)
            assert torch.equal(reduced.indices, budgeted.indices)
