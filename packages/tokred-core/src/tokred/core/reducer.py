"""The `Reducer` interface every token reducer implements."""

from __future__ import annotations

import abc
import inspect
from typing import Any, ClassVar

import torch

from tokred.core.budget import Budget
from tokred.core.errors import BudgetError, InvalidInputError, InvalidTypeError, ReducerContractError
from tokred.core.ops.selection import topk_indices
from tokred.core.reduction import Reduction

__all__ = ["CALLER_SCORES", "Reducer", "select_top"]

CALLER_SCORES = "caller"
"""The [`Reducer.needs_scores`][tokred.core.Reducer.needs_scores] of a reducer that ranks whatever scores its
caller computes (``topk``): no model integration supplies such scores, so attaching it to a model is refused."""

_BUDGET_FIELDS = ("num_keep", "keep_ratio", "num_remove")


class Reducer(abc.ABC):
    """Base class of every token reducer: given token sets, decide which tokens survive and what they carry.

    A reducer is built with its hyper-parameters and, usually, a budget (at most one of ``num_keep``,
    ``keep_ratio`` and ``num_remove``), and called on a batch of token sets:

    ```python
    reduction = reducer(tokens, scores=None, protected=None, sizes=None)
    ```

    The call validates the inputs, resolves the budget to ``K`` tokens per set, returns every token unchanged
    when ``K >= N``, and otherwise delegates to [`reduce`][tokred.core.Reducer.reduce], the one method a
    subclass implements. The result is a [`Reduction`][tokred.core.Reduction] whose plan can be applied to
    any other per-token tensor.

    A reducer built without a budget is meant for a model's schedule, which passes the count of every step
    as the call's ``num_keep`` (a Vision Mamba model's ``flops_cut``, a stage inside a language model);
    called without one, it raises [`BudgetError`][tokred.core.errors.BudgetError].

    Subclasses take their own hyper-parameters as keyword arguments plus ``**budget`` (passed on to this
    constructor), and store each hyper-parameter under an attribute of the same name, so
    [`config`][tokred.core.Reducer.config] (and ``create_reducer(name, **reducer.config())``) reproduces the
    reducer.

    Attributes:
        name: Registry name, set by [`register_reducer`][tokred.core.register_reducer].
        needs_scores: Which importance scores [`reduce`][tokred.core.Reducer.reduce] ranks tokens by. None
            (the default): the tokens alone, and passing ``scores`` is an error, so nothing is silently
            ignored. The name of a model-supplied score, such as ``"delta"`` (Vision Mamba's Δ timescale,
            which tokred-mamba models supply): a model integration that can compute it passes it as
            ``scores``, and one that cannot refuses the reducer when it is attached.
            [`CALLER_SCORES`][tokred.core.reducer.CALLER_SCORES]: whatever the caller computes (``topk``).
            In every case but None, ``scores`` must be given to each call.
        stochastic: Whether results depend on random draws (then they are reproducible under a ``seed``).
        budget: The [`Budget`][tokred.core.Budget], or None for a reducer built without one.

    Args:
        num_keep: Tokens kept per token set (``>= 1``).
        keep_ratio: Fraction of tokens kept, in ``(0, 1]``, rounded half up, at least 1.
        num_remove: Tokens removed per token set (``>= 0``), ToMe's ``r``.
    """

    name: ClassVar[str] = ""
    needs_scores: ClassVar[str | None] = None
    stochastic: ClassVar[bool] = False

    def __init__(
        self, *, num_keep: int | None = None, keep_ratio: float | None = None, num_remove: int | None = None
    ) -> None:
        given = any(value is not None for value in (num_keep, keep_ratio, num_remove))
        self.budget: Budget | None = (
            Budget(num_keep=num_keep, keep_ratio=keep_ratio, num_remove=num_remove) if given else None
        )

    @property
    def num_keep(self) -> int | None:
        """The absolute budget, or None when the budget is a ratio, a removal count or absent."""
        return None if self.budget is None else self.budget.num_keep

    @property
    def keep_ratio(self) -> float | None:
        """The relative budget, or None."""
        return None if self.budget is None else self.budget.keep_ratio

    @property
    def num_remove(self) -> int | None:
        """The removal budget (tokens removed per call), or None."""
        return None if self.budget is None else self.budget.num_remove

    def score_options(self) -> dict[str, Any]:
        """How this reducer wants its model-supplied scores computed, for the integration that supplies them.

        MTR, for example, asks for its Δ scores summed over ``directions`` and reduced over channels by
        ``channel_reduce``. Reducers with ``needs_scores=None`` have none.

        Returns:
            Keyword arguments for the integration's score function; empty by default.
        """
        return {}

    def __call__(
        self,
        tokens: torch.Tensor,
        *,
        scores: torch.Tensor | None = None,
        protected: torch.Tensor | None = None,
        sizes: torch.Tensor | None = None,
        num_keep: int | None = None,
    ) -> Reduction:
        """Reduce a batch of token sets.

        Args:
            tokens: Tokens of shape ``(B, N, C)``, any floating dtype, any device. Not modified.
            scores: Importance of shape ``(B, N)`` (higher = more important), required by reducers whose
                ``needs_scores`` is set and refused by the others.
            protected: Optional bool mask of shape ``(B, N)``: tokens that must survive unchanged (class
                tokens, newline tokens). They count towards the budget.
            sizes: Optional sizes of shape ``(B, N)``: how many original tokens each input token already
                stands for (after earlier merges); merges weight by them.
            num_keep: Optional budget for this call only, overriding the reducer's own: models whose
                schedule decides how many tokens each step keeps pass it. Required when the reducer was
                built without a budget.

        Returns:
            The `Reduction`: ``K = min(N, budget)`` tokens per set, in the dtype and on the device of
            ``tokens``.

        Raises:
            InvalidInputError: On malformed inputs (wrong rank or shape, empty, NaN or inf), with what to change.
            BudgetError: If some row has more protected tokens than the budget, or there is no budget at all.
        """
        protected_mask = self._check_inputs(tokens, scores, protected, sizes)
        num_tokens = tokens.shape[1]
        if num_keep is not None:
            num_keep = Budget(num_keep=num_keep).resolve(num_tokens)
        elif self.budget is not None:
            num_keep = self.budget.resolve(num_tokens)
        else:
            raise BudgetError(
                f"{type(self).__name__} was built without a budget; give it one (num_keep=..., keep_ratio=... or "
                "num_remove=...) or pass num_keep= to this call"
            )
        if protected is not None:
            most_protected = int(protected_mask.sum(dim=1).max())
            if most_protected > num_keep:
                raise BudgetError(
                    f"{most_protected} protected tokens exceed the budget of {num_keep} tokens; "
                    "raise num_keep / keep_ratio or protect fewer tokens"
                )
        if num_keep >= num_tokens:
            return Reduction.identity(tokens, sizes)
        reduction = self.reduce(tokens, num_keep, scores=scores, protected=protected_mask, sizes=sizes)
        if reduction.tokens.shape != (tokens.shape[0], num_keep, tokens.shape[2]):
            raise ReducerContractError(
                f"{type(self).__name__}.reduce returned tokens of shape "
                f"{tuple(reduction.tokens.shape)}; expected {(tokens.shape[0], num_keep, tokens.shape[2])}"
            )
        return reduction

    @abc.abstractmethod
    def reduce(
        self,
        tokens: torch.Tensor,
        num_keep: int,
        *,
        scores: torch.Tensor | None,
        protected: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> Reduction:
        """Compute the reduction; called by ``__call__`` with validated inputs and ``num_keep < N``.

        Implementations must not modify their inputs, must keep every protected token unchanged in the
        output, must return indices in ascending order and tokens in the dtype of ``tokens``.

        Args:
            tokens: Tokens of shape ``(B, N, C)``.
            num_keep: ``K``, with ``max protected per row <= K < N``.
            scores: Importance ``(B, N)``, or None when ``needs_scores`` is None.
            protected: Bool mask ``(B, N)``; all False when the caller protected nothing.
            sizes: Sizes ``(B, N)`` or None.

        Returns:
            A `Reduction` with ``K`` tokens per set.
        """

    def config(self) -> dict[str, Any]:
        """The constructor arguments of this reducer, such that ``type(self)(**config())`` rebuilds it."""
        params = inspect.signature(type(self).__init__).parameters
        own = {
            name: getattr(self, name)
            for name, param in params.items()
            if name not in ("self", *_BUDGET_FIELDS) and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
        }
        budget = dict.fromkeys(_BUDGET_FIELDS) if self.budget is None else self.budget.as_dict()
        return {**budget, **own}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if v is not None)
        return f"{type(self).__name__}({args})"

    def _check_inputs(
        self,
        tokens: torch.Tensor,
        scores: torch.Tensor | None,
        protected: torch.Tensor | None,
        sizes: torch.Tensor | None,
    ) -> torch.Tensor:
        """Validate the call's inputs; return the protected mask (all False when none was given)."""
        if not isinstance(tokens, torch.Tensor):
            raise InvalidTypeError(f"tokens must be a torch.Tensor of shape (B, N, C); got {type(tokens).__name__}")
        if tokens.dim() != 3:
            hint = " Add a batch dimension with tokens.unsqueeze(0)." if tokens.dim() == 2 else ""
            raise InvalidInputError(f"tokens must have shape (B, N, C); got shape {tuple(tokens.shape)}.{hint}")
        if not tokens.is_floating_point():
            raise InvalidTypeError(f"tokens must be a floating-point tensor; got dtype {tokens.dtype}")
        batch, num_tokens, channels = tokens.shape
        if batch == 0 or num_tokens == 0 or channels == 0:
            raise InvalidInputError(f"tokens must not be empty; got shape {tuple(tokens.shape)}")
        if not _all_finite(tokens):
            raise InvalidInputError(
                "tokens contain NaN or inf; check the model's outputs (an fp16 overflow is a common "
                "cause) before reducing"
            )
        expected = (batch, num_tokens)
        if scores is not None:
            if self.needs_scores is None:
                raise InvalidInputError(
                    f"{type(self).__name__} ranks tokens by their features alone; do not pass scores to it"
                )
            _check_per_token("scores", scores, expected)
            if not _all_finite(scores):
                raise InvalidInputError("scores contain NaN or inf")
        elif self.needs_scores is not None:
            raise InvalidInputError(
                f"{type(self).__name__} needs scores of shape (B, N) = {expected} ({self.needs_scores!r} scores); "
                "pass scores=..."
            )
        if protected is not None:
            _check_per_token("protected", protected, expected)
            if protected.dtype != torch.bool:
                raise InvalidTypeError(f"protected must be a bool tensor; got {protected.dtype}")
            if protected.device != tokens.device:
                raise InvalidInputError(f"protected is on {protected.device} but tokens are on {tokens.device}")
        if sizes is not None:
            _check_per_token("sizes", sizes, expected)
            if not bool((torch.isfinite(sizes) & (sizes > 0)).all()):
                raise InvalidInputError("sizes must be finite and positive")
        if protected is None:
            return torch.zeros(expected, dtype=torch.bool, device=tokens.device)
        return protected


def _check_per_token(name: str, value: object, expected: tuple[int, int]) -> None:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise InvalidInputError(f"{name} must have shape (B, N) = {expected}; got {got}")


def _all_finite(x: torch.Tensor) -> bool:
    # min/max propagate NaN and reach ±inf, so two reductions answer the question without materialising a
    # (B, N, C) bool mask: an order of magnitude cheaper than isfinite(x).all() on CPU, and one sync on GPU.
    return bool(torch.isfinite(torch.stack(torch.aminmax(x.detach()))).all())


def select_top(scores: torch.Tensor, num_keep: int, protected: torch.Tensor) -> torch.Tensor:
    """Positions of the ``num_keep`` highest scores per row, protected tokens always included.

    The building block of score-based reducers: protected tokens are taken first, the rest of the budget
    goes to the best-scored tokens, ties to the lower position.

    Args:
        scores: Scores of shape ``(B, N)`` (higher is better).
        num_keep: ``K``, at least the number of protected tokens in every row.
        protected: Bool mask of shape ``(B, N)``.

    Returns:
        Long tensor ``(B, K)``, ascending in every row.
    """
    ranked = scores.float().masked_fill(protected, float("inf"))
    return topk_indices(ranked, num_keep)
