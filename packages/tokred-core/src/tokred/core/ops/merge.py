"""Size-weighted scatter merging and nearest-target assignment."""

from __future__ import annotations

import torch

from tokred.core.errors import InvalidInputError, InvalidTypeError
from tokred.core.ops._checks import check_float, check_rank
from tokred.core.ops.precision import compute_dtype
from tokred.core.ops.similarity import cosine_similarity

__all__ = ["assign_to_nearest", "merge_weights", "scatter_merge"]


def _check_assignment(assignment: torch.Tensor, num_slots: int) -> None:
    check_rank("assignment", assignment, 2, "(B, N)")
    if assignment.dtype != torch.long:
        raise InvalidTypeError(f"assignment must be a long tensor; got {assignment.dtype}")
    if assignment.numel() and (int(assignment.min()) < -1 or int(assignment.max()) >= num_slots):
        raise InvalidInputError(
            f"assignment values must lie in [-1, {num_slots}); got range "
            f"[{int(assignment.min())}, {int(assignment.max())}]"
        )


def merge_weights(
    assignment: torch.Tensor, num_slots: int, sizes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights that turn a scatter-sum into a size-weighted mean per slot.

    Token ``i`` goes to slot ``assignment[i]`` (``-1``: dropped, weight 0). Its weight is its size divided by
    the total size of its slot, so the weights of every occupied slot sum to 1. With ``sizes`` omitted every
    token has size 1 and each slot becomes a plain average.

    Args:
        assignment: Long tensor of shape ``(B, N)`` with values in ``[-1, K)``.
        num_slots: ``K``.
        sizes: Optional sizes of shape ``(B, N)`` (how many original tokens each input token stands for).

    Returns:
        ``(weights, slot_sizes)``: weights of shape ``(B, N)`` and the total size of each slot, shape
        ``(B, K)``, both fp32 (fp64 when ``sizes`` is fp64).
    """
    _check_assignment(assignment, num_slots)
    batch, num_tokens = assignment.shape
    dtype = compute_dtype(sizes)
    if sizes is None:
        token_sizes = torch.ones((batch, num_tokens), dtype=dtype, device=assignment.device)
    else:
        if sizes.shape != assignment.shape:
            raise InvalidInputError(f"sizes must have shape {tuple(assignment.shape)}; got {tuple(sizes.shape)}")
        token_sizes = sizes.to(dtype)
    kept = assignment >= 0
    token_sizes = token_sizes * kept
    # Dropped tokens are routed to a spare slot K that is cut off afterwards.
    target = torch.where(kept, assignment, num_slots)
    slot_sizes = torch.zeros((batch, num_slots + 1), dtype=dtype, device=assignment.device)
    slot_sizes.scatter_add_(1, target, token_sizes)
    slot_sizes = slot_sizes[:, :num_slots]
    denom = slot_sizes.gather(1, assignment.clamp_min(0)).clamp_min(torch.finfo(dtype).tiny)
    weights = torch.where(kept, token_sizes / denom, torch.zeros((), dtype=dtype, device=assignment.device))
    return weights, slot_sizes


def scatter_merge(
    x: torch.Tensor, assignment: torch.Tensor, num_slots: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted sum of the tokens assigned to each slot: ``out[b, j] = sum_{i: a[b, i] = j} w[b, i] x[b, i]``.

    With weights from [`merge_weights`][tokred.core.ops.merge.merge_weights] this is a size-weighted mean per slot. The
    sum runs in fp32 (fp64 stays fp64) and the result is cast back to the dtype of ``x``. Tokens with assignment ``-1``
    contribute nothing; a slot no token maps to is zero.

    Args:
        x: Floating per-token tensor of shape ``(B, N, *)``.
        assignment: Long tensor of shape ``(B, N)`` with values in ``[-1, K)``.
        num_slots: ``K``.
        weights: Optional weights of shape ``(B, N)``; all ones (a plain sum) when omitted.

    Returns:
        Tensor of shape ``(B, K, *)`` with the dtype of ``x``.

    Examples:
        >>> import torch
        >>> from tokred.core.ops import merge_weights, scatter_merge
        >>> x = torch.tensor([[[1.0], [3.0], [10.0]]])
        >>> a = torch.tensor([[0, 0, 1]])
        >>> w, _ = merge_weights(a, 2)
        >>> scatter_merge(x, a, 2, w)
        tensor([[[ 2.],
                 [10.]]])
    """
    check_float("x", x)
    _check_assignment(assignment, num_slots)
    if x.shape[:2] != assignment.shape:
        raise InvalidInputError(
            f"x must have shape (B, N, ...) = {tuple(assignment.shape)} + (...); got {tuple(x.shape)}"
        )
    dtype = compute_dtype(x)
    batch, num_tokens = assignment.shape
    flat = x.to(dtype).reshape(batch, num_tokens, -1)  # (B, N, D)
    if weights is not None:
        if weights.shape != assignment.shape:
            raise InvalidInputError(f"weights must have shape {tuple(assignment.shape)}; got {tuple(weights.shape)}")
        flat = flat * weights.to(dtype).unsqueeze(-1)
    target = torch.where(assignment >= 0, assignment, num_slots)
    out = torch.zeros((batch, num_slots + 1, flat.shape[-1]), dtype=dtype, device=x.device)
    out.scatter_add_(1, target.unsqueeze(-1).expand_as(flat), flat)
    return out[:, :num_slots].reshape(batch, num_slots, *x.shape[2:]).to(x.dtype)


def assign_to_nearest(
    sources: torch.Tensor, targets: torch.Tensor, *, target_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """For each source token, the index of its most cosine-similar target token.

    Ties go to the lower target index. This is the "merge every dropped token into its nearest kept token"
    step of ApET and MTR.

    Args:
        sources: Tokens of shape ``(B, S, C)``.
        targets: Candidate tokens of shape ``(B, T, C)``.
        target_mask: Optional bool mask of shape ``(B, T)``; targets where it is False are never chosen. Every
            row needs at least one allowed target.

    Returns:
        Long tensor of shape ``(B, S)`` with values in ``[0, T)``.
    """
    check_rank("sources", sources, 3, "(B, S, C)")
    check_rank("targets", targets, 3, "(B, T, C)")
    check_float("sources", sources)
    if targets.shape[1] == 0:
        raise InvalidInputError("targets must contain at least one token")
    sim = cosine_similarity(sources, targets.to(sources.dtype))  # (B, S, T)
    if target_mask is not None:
        if target_mask.shape != (targets.shape[0], targets.shape[1]) or target_mask.dtype != torch.bool:
            raise InvalidInputError(f"target_mask must be a bool tensor of shape {tuple(targets.shape[:2])}")
        if not bool(target_mask.any(dim=1).all()):
            raise InvalidInputError("target_mask leaves a row without any allowed target")
        sim = sim.masked_fill(~target_mask.unsqueeze(1), float("-inf"))
    return sim.argmax(dim=-1)
