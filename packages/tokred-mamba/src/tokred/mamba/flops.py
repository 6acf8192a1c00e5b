"""FLOPs of Vim / VideoMamba models, dense or reduced, under the conventions papers use.

Counted per the hook convention of R-MeeTo and DyVM, in multiply-accumulates
reported as FLOPs: per block and token, ``in_proj`` (``2E·D``), the depthwise conv (``E·K``), ``x_proj``
(``E·(R + 2N)``), ``dt_proj`` (``R·E``), the scan (``9·E·N + 2·E``) and ``out_proj`` (``E·D``); plus the patch
embedding and the head. ``"one_direction"`` counts the conv, projections and scan of one scan direction —
the convention behind the published 1.45 / 5.08 / 18.87 GFLOPs of Vim-T/S/B — and ``"both_directions"``
counts both, which is what bidirectional Vim actually runs. Norms, gating and the token reduction's own
matching are not counted, in either convention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from tokred.core.errors import InvalidInputError, InvalidTypeError

__all__ = ["block_flops", "count_flops", "token_counts"]

Convention = Literal["one_direction", "both_directions"]


class MambaVisionModel(Protocol):
    """The attributes of a tokred-mamba model that FLOPs counting reads."""

    embed_dim: int
    depth: int
    d_inner: int
    d_state: int
    dt_rank: int
    d_conv: int
    patch_size: int
    stride: int
    num_frames: int
    num_classes: int
    img_size: int


def block_flops(model: MambaVisionModel, num_tokens: int, convention: Convention = "one_direction") -> int:
    """FLOPs of one block on ``num_tokens`` tokens.

    Args:
        model: A tokred-mamba model (its sizes are read).
        num_tokens: ``L``, the tokens entering the block.
        convention: ``"one_direction"`` or ``"both_directions"``.
    """
    d, e, n, r, k = model.embed_dim, model.d_inner, model.d_state, model.dt_rank, model.d_conv
    shared = 2 * e * d + e * d  # in_proj and out_proj run once for both directions
    per_direction = e * k + e * (r + 2 * n) + r * e + 9 * e * n + 2 * e
    if convention == "one_direction":
        directions = 1
    elif convention == "both_directions":
        directions = 2
    else:
        raise InvalidInputError(f"convention must be 'one_direction' or 'both_directions'; got {convention!r}")
    return num_tokens * (shared + directions * per_direction)


def _num_patches(model: MambaVisionModel, image_size: int) -> int:
    grid = (image_size - model.patch_size) // model.stride + 1
    if grid <= 0:
        raise InvalidInputError(f"image_size {image_size} is smaller than the patch size {model.patch_size}")
    return grid * grid * model.num_frames


def token_counts(
    model: MambaVisionModel, image_size: int | None = None, schedule: Mapping[int, int] | None = None
) -> list[int]:
    """Tokens entering each block, dense or under a schedule ``{block index: tokens removed after it}``."""
    count = _num_patches(model, image_size or model.img_size) + 1  # + the class token
    counts = []
    for index in range(model.depth):
        counts.append(count)
        count -= (schedule or {}).get(index, 0)
    return counts


def count_flops(
    model: MambaVisionModel,
    image_size: int | None = None,
    convention: Convention = "one_direction",
    *,
    schedule: Mapping[int, int] | Sequence[int] | None = None,
) -> float:
    """Total FLOPs of one forward pass of one image (or clip), in FLOPs (divide by 1e9 for GFLOPs).

    Args:
        model: A tokred-mamba model. If a reducer is attached with [`tokred.mamba.attach`][tokred.mamba.attach],
            its schedule is used unless ``schedule`` is given.
        image_size: Input side in pixels; the model's own ``img_size`` by default.
        convention: ``"one_direction"`` (the published convention) or ``"both_directions"``.
        schedule: ``{block index: tokens removed after that block}``; ``{}`` counts the dense model.

    Returns:
        FLOPs as a float.

    Examples:
        >>> from tokred.mamba import count_flops, create_model
        >>> import torch
        >>> with torch.device("meta"):
        ...     vim_t = create_model("vim_tiny")
        >>> round(count_flops(vim_t) / 1e9, 2)
        1.45
    """
    if schedule is None:
        hook = getattr(model, "token_reduction", None)
        schedule = dict(getattr(hook, "schedule", {}) or {})
    elif not isinstance(schedule, Mapping):
        raise InvalidTypeError("schedule must be a mapping {block index: tokens removed after it}")
    size = image_size or model.img_size
    counts = token_counts(model, size, schedule)
    if min(counts) < 1:
        raise InvalidInputError(f"the schedule removes more tokens than there are ({counts[0]} at the start)")
    blocks = sum(block_flops(model, count, convention) for count in counts)
    patch_embed = _num_patches(model, size) * model.embed_dim * 3 * model.patch_size * model.patch_size
    head = model.embed_dim * model.num_classes
    return float(blocks + patch_embed + head)
