"""The `Reducer` interface every token reducer implements."""

from __future__ import annotations

import abc
import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokred.core.budget import Budget
from tokred.core.errors import BudgetError
from tokred.core.ops.selection import topk_indices
from tokred.core.reduction import Reduction

if TYPE_CHECKING:
    pass

__all__ = ["Reducer", "select_top"]

_BUDGET_FIELDS = ("num_keep", "keep_ratio", "num_remove")


class Reducer(abc.ABC):
    """Base class of every token reducer: given token sets, decide which tokens survive and what they carry.

    A reducer is built with its hyper-parameters and a budget (exactly one of ``num_keep``, ``keep_ratio`` and
    ``num_remove``) and called on a batch of token sets::

        reduction = reducer(tokens, scores=None, protected=None, sizes=None)

    The call validates the inputs, resolves the budget to ``K`` tokens per set, returns every token unchanged
    when ``K >= N``, and otherwise delegates to :meth:`reduce`, the one method a subclass implements. The
    result is a :class:`~tokred.core.Reduction` whose plan can be applied to any other per-token tensor.

    Subclasses take their own hyper-parameters as keyword arguments plus ``**budget`` (passed on to this
    constructor), and store each hyper-parameter under an attribute of the same name, so :meth:`config` (and
    ``create_reducer(name, **reducer.config())``) reproduces the reducer.

    Attributes:
        name: Registry name, set by :func:`~tokred.core.register_reducer`.
        accepts_scores: Whether :meth:`reduce` uses external ``scores`` (attention, Δ, …). Passing scores to a
            reducer that would ignore them is an error, so nothing is silently dropped.
        requires_scores: Whether ``scores`` must be given.
        stochastic: Whether results depend on random draws (then they are reproducible under a ``seed``).

    Args:
        num_keep: Tokens kept per token set (``>= 1``).
        keep_ratio: Fraction of tokens kept, in ``(0, 1]``, rounded half up, at least 1.
        num_remove: Tokens removed per token set (``>= 0``), ToMe's ``r``.
    """

    name: ClassVar[str] = ""
    accepts_scores: ClassVar[bool] = False
    requires_scores: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False

    def __init__(
        self, *, num_keep: int | None = None, keep_ratio: float | None = None, num_remove: int | None = None
    ) -> None:
        self.budget = Budget(num_keep=num_keep, keep_ratio=keep_ratio, num_remove=num_remove)

    @property
    def num_keep(self) -> int | None:
        """The absolute budget, or None when the budget is a ratio."""
        return self.budget.num_keep

    @property
    def keep_ratio(self) -> float | None:
        """The relative budget, or None when the budget is a count."""
        return self.budget.keep_ratio

    @property
    def num_remove(self) -> int | None:
        """The removal budget (tokens removed per call), or None."""
        return self.budget.num_remove

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
            scores: Optional importance of shape ``(B, N)`` supplied by the model (higher = more important),
                for reducers with ``accepts_scores``.
            protected: Optional bool mask of shape ``(B, N)``: tokens that must survive unchanged (class
                tokens, newline tokens). They count towards the budget.
            sizes: Optional sizes of shape ``(B, N)``: how many original tokens each input token already
                stands for (after earlier merges); merges weight by them.
            num_keep: Optional budget for this call only, overriding the reducer's own: models whose
                schedule decides how many tokens each step keeps pass it.

        Returns:
            The `Reduction`: ``K = min(N, budget)`` tokens per set, in the dtype and on the device of
            ``tokens``.

        Raises:
            ValueError: On malformed inputs (wrong rank or shape, empty, NaN or inf), with what to change.
            BudgetError: If some row has more protected tokens than the budget.
        """
        protected_mask = self._check_inputs(tokens, scores, protected, sizes)
        num_tokens = tokens.shape[1]
        if num_keep is None:
            num_keep = self.budget.resolve(num_tokens)
        else:
            num_keep = Budget(num_keep=num_keep).resolve(num_tokens)
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
            raise RuntimeError(
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
            scores: Importance ``(B, N)`` or None (only when ``accepts_scores``).
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
        return {**self.budget.as_dict(), **own}

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
            raise TypeError(f"tokens must be a torch.Tensor of shape (B, N, C); got {type(tokens).__name__}")
        if tokens.dim() != 3:
            hint = " Add a batch dimension with tokens.unsqueeze(0)." if tokens.dim() == 2 else ""
            raise ValueError(f"tokens must have shape (B, N, C); got shape {tuple(tokens.shape)}.{hint}")
        if not tokens.is_floating_point():
            raise TypeError(f"tokens must be a floating-point tensor; got dtype {tokens.dtype}")
        batch, num_tokens, channels = tokens.shape
        if batch == 0 or num_tokens == 0 or channels == 0:
            raise ValueError(f"tokens must not be empty; got shape {tuple(tokens.shape)}")
        if not _all_finite(tokens):
            raise ValueError(
                "tokens contain NaN or inf; check the model's outputs (an fp16 overflow is a common "
                "cause) before reducing"
            )
        expected = (batch, num_tokens)
        if scores is not None:
            if not self.accepts_scores:
                raise ValueError(f"{type(self).__name__} does not use external scores; do not pass scores to it")
            _check_per_token("scores", scores, expected)
            if not _all_finite(scores):
                raise ValueError("scores contain NaN or inf")
        elif self.requires_scores:
            raise ValueError(f"{type(self).__name__} needs scores of shape (B, N) = {expected}; pass scores=...")
        if protected is not None:
            _check_per_token("protected", protected, expected)
            if protected.dtype != torch.bool:
                raise TypeError(f"protected must be a bool tensor; got {protected.dtype}")
            if protected.device != tokens.device:
                raise ValueError(f"protected is on {protected.device} but tokens are on {tokens.device}")
        if sizes is not None:
            _check_per_token("sizes", sizes, expected)
            if not bool((torch.isfinite(sizes) & (sizes > 0)).all()):
                raise ValueError("sizes must be finite and positive")
        if protected is None:
            return torch.zeros(expected, dtype=torch.bool, device=tokens.device)
        return protected


def _check_per_token(name: str, value: object, expected: tuple[int, int]) -> None:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must have shape (B, N) = {expected}; got {got}")


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
