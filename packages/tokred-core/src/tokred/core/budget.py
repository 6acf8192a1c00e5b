"""Token budgets: how many tokens a reducer keeps."""

from __future__ import annotations

import math
import numbers

from tokred.core.errors import BudgetError

__all__ = ["Budget"]


class Budget:
    """A keep budget given either as an absolute count or as a fraction of the tokens.

    Exactly one of ``num_keep`` and ``keep_ratio`` is given. A ratio is turned into a count per call, rounded
    half up and at least 1, so it adapts to images of any resolution.

    Args:
        num_keep: Tokens kept per token set, ``>= 1``. A count ``>= N`` keeps every token.
        keep_ratio: Fraction of tokens kept, in ``(0, 1]``.

    Raises:
        BudgetError: If both or neither are given, or a value is out of range.

    Example:
        >>> from tokred.core import Budget
        >>> Budget(keep_ratio=0.25).resolve(576)
        144
        >>> Budget(num_keep=64).resolve(10)
        10
    """

    __slots__ = ("keep_ratio", "num_keep")

    def __init__(self, num_keep: int | None = None, keep_ratio: float | None = None) -> None:
        if (num_keep is None) == (keep_ratio is None):
            raise BudgetError(
                f"give exactly one of num_keep and keep_ratio; got num_keep={num_keep!r}, keep_ratio={keep_ratio!r}"
            )
        if num_keep is not None:
            if isinstance(num_keep, bool) or not isinstance(num_keep, numbers.Integral):
                raise BudgetError(f"num_keep must be an int; got {num_keep!r}")
            if num_keep <= 0:
                raise BudgetError(f"num_keep must be >= 1; got {num_keep}. To keep every token, do not reduce")
            num_keep = int(num_keep)
        if keep_ratio is not None:
            if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
                raise BudgetError(f"keep_ratio must be a number in (0, 1]; got {keep_ratio!r}")
            if not 0.0 < float(keep_ratio) <= 1.0:
                raise BudgetError(f"keep_ratio must lie in (0, 1]; got {keep_ratio}")
            keep_ratio = float(keep_ratio)
        self.num_keep: int | None = num_keep
        self.keep_ratio: float | None = keep_ratio

    def resolve(self, num_tokens: int) -> int:
        """The number of tokens to keep out of ``num_tokens``, never more than ``num_tokens``."""
        if self.num_keep is not None:
            return min(self.num_keep, num_tokens)
        assert self.keep_ratio is not None
        return min(num_tokens, max(1, math.floor(self.keep_ratio * num_tokens + 0.5)))

    def __repr__(self) -> str:
        if self.num_keep is not None:
            return f"Budget(num_keep={self.num_keep})"
        return f"Budget(keep_ratio={self.keep_ratio})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Budget) and (self.num_keep, self.keep_ratio) == (other.num_keep, other.keep_ratio)

    def __hash__(self) -> int:
        return hash((self.num_keep, self.keep_ratio))
