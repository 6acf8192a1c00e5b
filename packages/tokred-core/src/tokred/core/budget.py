"""Token budgets: how many tokens a reducer keeps."""

from __future__ import annotations

import math
import numbers
from typing import TypedDict

from tokred.core.errors import BudgetError

__all__ = ["Budget", "BudgetKwargs"]


class BudgetKwargs(TypedDict, total=False):
    """The budget keywords every reducer accepts; give exactly one."""

    num_keep: int | None
    keep_ratio: float | None
    num_remove: int | None


class Budget:
    """How many tokens a reducer keeps: an absolute count, a fraction, or a number of tokens to remove.

    Exactly one of ``num_keep``, ``keep_ratio`` and ``num_remove`` is given. A ratio is turned into a count per
    call, rounded half up and at least 1, so it adapts to images of any resolution. ``num_remove`` is ToMe's
    ``r``: the tokens removed per call, the natural unit of a per-layer schedule.

    Args:
        num_keep: Tokens kept per token set, ``>= 1``. A count ``>= N`` keeps every token.
        keep_ratio: Fraction of tokens kept, in ``(0, 1]``.
        num_remove: Tokens removed per token set, ``>= 0``; ``0`` keeps every token. Removing all ``N`` tokens
            (or more) is an error, since at least one must remain.

    Raises:
        BudgetError: If none or several are given, or a value is out of range.

    Examples:
        >>> from tokred.core import Budget
        >>> Budget(keep_ratio=0.25).resolve(576)
        144
        >>> Budget(num_keep=64).resolve(10)
        10
        >>> Budget(num_remove=14).resolve(197)
        183
    """

    __slots__ = ("keep_ratio", "num_keep", "num_remove")

    def __init__(
        self, num_keep: int | None = None, keep_ratio: float | None = None, num_remove: int | None = None
    ) -> None:
        given = [
            name
            for name, value in (("num_keep", num_keep), ("keep_ratio", keep_ratio), ("num_remove", num_remove))
            if value is not None
        ]
        if len(given) != 1:
            raise BudgetError(
                "give exactly one of num_keep, keep_ratio and num_remove; got "
                f"num_keep={num_keep!r}, keep_ratio={keep_ratio!r}, num_remove={num_remove!r}"
            )
        if num_keep is not None:
            num_keep = _as_int("num_keep", num_keep)
            if num_keep <= 0:
                raise BudgetError(f"num_keep must be >= 1; got {num_keep}. To keep every token, do not reduce")
        if num_remove is not None:
            num_remove = _as_int("num_remove", num_remove)
            if num_remove < 0:
                raise BudgetError(f"num_remove must be >= 0; got {num_remove}")
        if keep_ratio is not None:
            if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
                raise BudgetError(f"keep_ratio must be a number in (0, 1]; got {keep_ratio!r}")
            if not 0.0 < float(keep_ratio) <= 1.0:
                raise BudgetError(f"keep_ratio must lie in (0, 1]; got {keep_ratio}")
            keep_ratio = float(keep_ratio)
        self.num_keep: int | None = num_keep
        self.keep_ratio: float | None = keep_ratio
        self.num_remove: int | None = num_remove

    def resolve(self, num_tokens: int) -> int:
        """The number of tokens to keep out of ``num_tokens``, never more than ``num_tokens``.

        Raises:
            BudgetError: If ``num_remove`` would leave no token.
        """
        if self.num_keep is not None:
            return min(self.num_keep, num_tokens)
        if self.num_remove is not None:
            if self.num_remove >= num_tokens:
                raise BudgetError(
                    f"cannot remove {self.num_remove} of {num_tokens} tokens: at least one must remain; "
                    "lower num_remove"
                )
            return num_tokens - self.num_remove
        assert self.keep_ratio is not None
        return min(num_tokens, max(1, math.floor(self.keep_ratio * num_tokens + 0.5)))

    def as_dict(self) -> BudgetKwargs:
        """The three budget keywords, as accepted by every reducer's constructor."""
        return {"num_keep": self.num_keep, "keep_ratio": self.keep_ratio, "num_remove": self.num_remove}

    def __repr__(self) -> str:
        field, value = next((k, v) for k, v in self.as_dict().items() if v is not None)
        return f"Budget({field}={value!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Budget) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().values()))


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BudgetError(f"{name} must be an int; got {value!r}")
    return int(value)
