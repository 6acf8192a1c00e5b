"""Farthest-point sampling over batched token sets."""

from __future__ import annotations

from typing import Literal

import torch

from tokred.core.errors import InvalidInputError
from tokred.core.ops._checks import check_float, check_rank
from tokred.core.ops.precision import compute_dtype

__all__ = ["farthest_point_sampling"]


def farthest_point_sampling(
    points: torch.Tensor,
    num_samples: int,
    *,
    start: int | torch.Tensor = 0,
    metric: Literal["euclidean", "cosine", "precomputed"] = "euclidean",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy farthest-point sampling: each pick maximises its distance to the points already picked.

    Starting from ``start``, repeatedly pick the point whose minimum distance to the picked set is largest.
    Ties go to the lower position, and a point is never picked twice, even when many points coincide (the
    rank-deficient case), so exactly ``num_samples`` distinct indices come back.

    Args:
        points: Tokens of shape ``(B, N, C)``, or pairwise distances ``(B, N, N)`` with
            ``metric="precomputed"``.
        num_samples: ``k``, how many points to pick, ``1 <= k <= N``.
        start: Index of the first pick: one int for every row, or a long tensor of shape ``(B,)``.
        metric: ``"euclidean"`` (squared L2 distance, as in ApET), ``"cosine"`` (``1 - cos``, as in
            DivPrune's max–min diversity), or ``"precomputed"`` when ``points`` already holds the distances
            (each step is then a row lookup, the fastest choice when the matrix exists anyway).
        valid: Optional bool mask of shape ``(B, N)``; points where it is False are never picked. The start
            point must be valid. A row with fewer than ``k`` valid points fills its remaining picks with -1.

    Returns:
        Long tensor of shape ``(B, k)`` in pick order (the first column is ``start``).

    Examples:
        >>> import torch
        >>> from tokred.core.ops import farthest_point_sampling
        >>> x = torch.tensor([[[0.0], [1.0], [10.0], [4.0]]])
        >>> farthest_point_sampling(x, 3)
        tensor([[0, 2, 3]])
    """
    check_rank("points", points, 3, "(B, N, C)")
    check_float("points", points)
    batch, num_points, _ = points.shape
    device = points.device
    if valid is not None:
        check_rank("valid", valid, 2, "(B, N)")
        if valid.shape != (batch, num_points) or valid.dtype != torch.bool:
            raise InvalidInputError(
                f"valid must be a bool tensor of shape {(batch, num_points)}; got {valid.dtype} {tuple(valid.shape)}"
            )
    if not 1 <= num_samples <= num_points:
        raise InvalidInputError(f"num_samples must be between 1 and N={num_points}; got {num_samples}")
    if metric not in ("euclidean", "cosine", "precomputed"):
        raise InvalidInputError(f"metric must be 'euclidean', 'cosine' or 'precomputed'; got {metric!r}")
    if metric == "precomputed" and points.shape[2] != num_points:
        raise InvalidInputError(f"precomputed distances must have shape (B, N, N); got {tuple(points.shape)}")

    rows = torch.arange(batch, device=device)
    if isinstance(start, torch.Tensor):
        if start.shape != (batch,):
            raise InvalidInputError(f"start must be an int or a tensor of shape ({batch},); got {tuple(start.shape)}")
        current = start.to(device=device, dtype=torch.long)
    else:
        current = torch.full((batch,), int(start), dtype=torch.long, device=device)
    if bool(((current < 0) | (current >= num_points)).any()):
        raise InvalidInputError(f"start must index a point in [0, {num_points}); got {start}")
    if valid is not None and not bool(valid[rows, current].all()):
        raise InvalidInputError("start must be a valid point in every row")

    feats = points.to(compute_dtype(points))
    if metric == "cosine":
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    elif metric == "euclidean":
        sq_norms = feats.pow(2).sum(dim=-1)  # (B, N)
    min_dist = torch.full((batch, num_points), float("inf"), dtype=feats.dtype, device=device)
    if valid is not None:
        min_dist = min_dist.masked_fill(~valid, float("-inf"))
    picks = torch.empty((batch, num_samples), dtype=torch.long, device=device)
    exhausted = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(num_samples):
        picks[:, step] = current.masked_fill(exhausted, -1)
        # -inf marks "already picked": coincident points then never win the argmax a second time.
        min_dist[rows, current] = float("-inf")
        if step + 1 == num_samples:
            break
        # One matrix-vector product per step instead of materialising (B, N, C) differences: the step then
        # reads the tokens once, which is what bounds FPS on a CPU.
        if metric == "precomputed":
            dist = feats[rows, current]  # (B, N)
        elif metric == "cosine":
            dist = 1.0 - torch.bmm(feats, feats[rows, current].unsqueeze(-1)).squeeze(-1)  # (B, N)
        else:
            dots = torch.bmm(feats, feats[rows, current].unsqueeze(-1)).squeeze(-1)  # (B, N)
            # |x - y|^2 = |x|^2 - 2 x.y + |y|^2; the clamp absorbs rounding below zero for coincident points.
            dist = (sq_norms - 2.0 * dots + sq_norms[rows, current].unsqueeze(1)).clamp_min(0.0)
        min_dist = torch.minimum(min_dist, dist)
        current = min_dist.argmax(dim=1)  # documented to return the first of tied maxima
        best = min_dist.amax(dim=1)
        exhausted = best == float("-inf")  # only possible with a valid mask
    return picks
