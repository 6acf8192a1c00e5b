"""``random``: keep a uniformly random subset of tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokred.core.budget import BudgetKwargs
from tokred.core.ops.random import make_generator, uniform_noise
from tokred.core.reducer import Reducer, select_top
from tokred.core.reduction import Reduction
from tokred.core.registry import register_reducer

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["RandomReducer"]


@register_reducer("random")
class RandomReducer(Reducer):
    """Keep a uniformly random subset of the tokens (seeded): the floor every method must beat.

    The draws come from the reducer's own generator on the CPU, so a given ``seed`` gives the same
    sequence of subsets on every device and is unaffected by other code using the global RNG. Each call
    advances the generator, so successive images get different subsets.

    Args:
        **budget: At most one of ``num_keep``, ``keep_ratio``, ``num_remove`` (see [`Budget`][tokred.core.Budget]).
        seed: Seed of the reducer's generator; None draws from PyTorch's global generator.
    """

    stochastic = True

    def __init__(self, *, seed: int | None = None, **budget: Unpack[BudgetKwargs]) -> None:
        super().__init__(**budget)
        self.seed = seed
        self._generator = make_generator(seed)

    def reduce(
        self,
        tokens: torch.Tensor,
        num_keep: int,
        *,
        scores: torch.Tensor | None,
        protected: torch.Tensor,
        sizes: torch.Tensor | None,
    ) -> Reduction:
        """Keep a random subset drawn from the reducer's generator."""
        noise = uniform_noise(tokens.shape[:2], generator=self._generator, device=tokens.device)  # (B, N)
        return Reduction.from_selection(tokens, select_top(noise, num_keep, protected), sizes)
