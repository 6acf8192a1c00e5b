"""The importance scores a tokred-mamba model can hand to a reducer: Mamba's Δ timescale.

A reducer says which model-supplied score it ranks tokens by through
[`Reducer.needs_scores`][tokred.core.Reducer.needs_scores]. A tokred-mamba model supplies ``"delta"``: after
each scheduled block, the block returns the Δ its two scans used
([`ScanDelta`][tokred.mamba.layers.ScanDelta]) and [`delta_importance`][tokred.mamba.scores.delta_importance]
turns it into one score per token, as the reducer's [`score_options`][tokred.core.Reducer.score_options] ask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from tokred.core.errors import InvalidInputError
from tokred.mamba.layers.mixer import ScanDelta

__all__ = ["DELTA", "SUPPLIED_SCORES", "delta_importance"]

DELTA = "delta"
"""The ``needs_scores`` name of Mamba's Δ timescale (MTR ranks by it)."""

Directions = Literal["both", "forward", "backward"]
ChannelReduce = Literal["mean", "max"]


def delta_importance(
    delta: ScanDelta, *, directions: Directions = "both", channel_reduce: ChannelReduce = "mean"
) -> torch.Tensor:
    """MTR's token importance from the Δ a Vision Mamba block has just used.

    Δ (after the softplus, exactly what the scan consumed) acts as an input gate: a large Δ writes the token
    strongly into the state, so a token with a large Δ matters to what follows.

    Args:
        delta: The block's two ``(B, E, L)`` Δ, in token order.
        directions: Sum both scan directions (default), or use one.
        channel_reduce: Average over the ``E`` channels (default) or take their maximum.

    Returns:
        Importance of shape ``(B, L)`` in fp32.

    Examples:
        >>> import torch
        >>> from tokred.mamba.layers import ScanDelta
        >>> from tokred.mamba.scores import delta_importance
        >>> delta = ScanDelta(torch.ones(1, 4, 3), torch.full((1, 4, 3), 2.0))
        >>> delta_importance(delta)
        tensor([[3., 3., 3.]])
    """
    if directions == "both":
        combined = delta.forward.float() + delta.backward.float()
    elif directions == "forward":
        combined = delta.forward.float()
    elif directions == "backward":
        combined = delta.backward.float()
    else:
        raise InvalidInputError(f"directions must be 'both', 'forward' or 'backward'; got {directions!r}")
    if channel_reduce == "mean":
        return combined.mean(dim=1)
    if channel_reduce == "max":
        return combined.amax(dim=1)
    raise InvalidInputError(f"channel_reduce must be 'mean' or 'max'; got {channel_reduce!r}")


SUPPLIED_SCORES: dict[str, Callable[..., torch.Tensor]] = {DELTA: delta_importance}
"""Score name → the function that computes it from a block's Δ, with the reducer's ``score_options()``."""
