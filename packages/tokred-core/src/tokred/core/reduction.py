"""`Reduction`: the plan a reducer returns, applicable to any other per-token tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tokred.core.errors import InvalidInputError, InvalidTypeError
from tokred.core.ops.merge import assign_to_nearest, merge_weights, scatter_merge
from tokred.core.ops.selection import gather_tokens

__all__ = ["Reduction"]


@dataclass(frozen=True, eq=False)
class Reduction:
    """The result of reducing a batch of token sets, and the plan that produced it.

    Each of the ``K`` output slots stands at one original position (``indices``) and holds a weighted
    combination of original tokens: token ``i`` contributes ``weights[i]`` to slot ``assignment[i]``
    (``-1``: dropped, contributes nothing). A plain selection has weight 1 on each kept token; a merge spreads
    the weight of a slot over the tokens it absorbed, in proportion to their sizes.

    Because the plan is explicit, a model applies it to every other per-token tensor it carries — hidden
    states and residual streams (``how="merge"``), position ids, attention masks or labels
    (``how="select"``) — and never re-derives it.

    Attributes:
        tokens: Reduced tokens of shape ``(B, K, C)``, in the dtype of the input.
        indices: Long tensor ``(B, K)``: the original position each slot stands at, ascending in every row.
        sizes: fp32 tensor ``(B, K)``: how many original tokens each slot represents (the sum of the input
            sizes merged into it; 1 for a token kept alone).
        assignment: Long tensor ``(B, N)``: the slot each original token ended in, or ``-1`` if it was
            dropped.
        weights: fp32 tensor ``(B, N)``: the contribution of each original token to its slot; the weights of
            every slot sum to 1, dropped tokens have weight 0.

    Examples:
        >>> import torch
        >>> from tokred.core import create_reducer
        >>> tokens = torch.randn(2, 16, 8)
        >>> reduction = create_reducer("norm", num_keep=4)(tokens)
        >>> reduction.tokens.shape, reduction.indices.shape
        (torch.Size([2, 4, 8]), torch.Size([2, 4]))
        >>> positions = torch.arange(16).expand(2, 16)
        >>> torch.equal(reduction.apply(positions, how="select"), reduction.indices)
        True
    """

    tokens: torch.Tensor
    indices: torch.Tensor
    sizes: torch.Tensor
    assignment: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        b, k = self.indices.shape
        if self.tokens.shape[:2] != (b, k) or self.sizes.shape != (b, k):
            raise InvalidInputError(
                f"inconsistent Reduction: tokens {tuple(self.tokens.shape)}, indices {(b, k)}, "
                f"sizes {tuple(self.sizes.shape)}"
            )
        if self.assignment.shape != self.weights.shape or self.assignment.shape[0] != b:
            raise InvalidInputError(
                f"inconsistent Reduction: assignment {tuple(self.assignment.shape)}, weights "
                f"{tuple(self.weights.shape)}, batch {b}"
            )

    @property
    def num_tokens(self) -> int:
        """``N``, the number of tokens before the reduction."""
        return self.assignment.shape[1]

    @property
    def num_kept(self) -> int:
        """``K``, the number of tokens after the reduction."""
        return self.indices.shape[1]

    @property
    def keep_mask(self) -> torch.Tensor:
        """Bool tensor ``(B, N)``: True at the original positions the slots stand at."""
        mask = torch.zeros(self.assignment.shape, dtype=torch.bool, device=self.indices.device)
        return mask.scatter(1, self.indices, True)

    @property
    def merged_mask(self) -> torch.Tensor:
        """Bool tensor ``(B, N)``: True for tokens merged into a slot that stands at another position."""
        return (self.assignment >= 0) & ~self.keep_mask

    @property
    def dropped_mask(self) -> torch.Tensor:
        """Bool tensor ``(B, N)``: True for tokens that contribute to no slot."""
        return self.assignment < 0

    def apply(self, x: torch.Tensor, how: Literal["merge", "select"] = "merge") -> torch.Tensor:
        """Apply this plan to another per-token tensor.

        Args:
            x: Tensor of shape ``(B, N, *)``.
            how: ``"merge"`` combines tokens with this plan's weights (for hidden states, residual streams,
                any floating features; computed in fp32, returned in the dtype of ``x``). ``"select"`` takes
                the entry at each slot's position (for position ids, masks, labels, anything discrete).

        Returns:
            Tensor of shape ``(B, K, *)``.
        """
        if x.dim() < 2 or tuple(x.shape[:2]) != tuple(self.assignment.shape):
            raise InvalidInputError(
                f"x must have shape (B, N, ...) with (B, N) = {tuple(self.assignment.shape)}; got {tuple(x.shape)}"
            )
        if how == "select":
            return gather_tokens(x, self.indices)
        if how == "merge":
            if not x.is_floating_point():
                raise InvalidTypeError(
                    f"how='merge' needs a floating tensor; got {x.dtype}. Use how='select' for positions, ids and masks"
                )
            return scatter_merge(x, self.assignment, self.num_kept, self.weights)
        raise InvalidInputError(f"how must be 'merge' or 'select'; got {how!r}")

    def compose(self, then: Reduction) -> Reduction:
        """Chain this reduction with one applied to its output, giving one plan from the original tokens.

        Weights multiply along the chain, so applying the composed plan to the original tokens equals applying
        the two plans one after the other. Use it to track where every original token went through several
        reduction steps (the class token of a Vision Mamba model, the patches drawn by a visualisation).

        Args:
            then: A reduction whose input is this reduction's output (``then.num_tokens == self.num_kept``).

        Returns:
            A `Reduction` from the ``N`` original tokens to ``then``'s slots, with ``then``'s tokens.
        """
        if then.num_tokens != self.num_kept or then.assignment.shape[0] != self.assignment.shape[0]:
            raise InvalidInputError(
                f"cannot compose: this reduction yields {self.num_kept} tokens but the next expects {then.num_tokens}"
            )
        mid = self.assignment.clamp_min(0)
        assignment = torch.where(self.assignment >= 0, then.assignment.gather(1, mid), -1)
        weights = torch.where(assignment >= 0, self.weights * then.weights.gather(1, mid), 0.0)
        indices = self.indices.gather(1, then.indices)
        return Reduction(then.tokens, indices, then.sizes, assignment, weights.to(self.weights.dtype))

    @classmethod
    def identity(cls, tokens: torch.Tensor, sizes: torch.Tensor | None = None) -> Reduction:
        """The reduction that keeps every token unchanged (what a budget ``>= N`` gives).

        Args:
            tokens: Tokens of shape ``(B, N, C)``.
            sizes: Optional sizes ``(B, N)`` of the input tokens; ones when omitted.
        """
        batch, num_tokens = tokens.shape[:2]
        device = tokens.device
        indices = torch.arange(num_tokens, device=device).expand(batch, num_tokens).clone()
        out_sizes = (
            torch.ones((batch, num_tokens), device=device)
            if sizes is None
            else sizes.to(device=device, dtype=torch.float32).clone()
        )
        weights = torch.ones((batch, num_tokens), dtype=torch.float32, device=device)
        return cls(tokens, indices, out_sizes, indices.clone(), weights)

    @classmethod
    def from_targets(
        cls, tokens: torch.Tensor, kept: torch.Tensor, targets: torch.Tensor, sizes: torch.Tensor | None = None
    ) -> Reduction:
        """Build a reduction from the positions kept and the position every token merges into.

        The common way for a reducer to finish: decide which tokens survive (``kept``) and, for every token,
        which surviving position it joins (itself if kept, another kept position if merged, ``-1`` if
        dropped). Slots become size-weighted means.

        Args:
            tokens: Tokens of shape ``(B, N, C)``.
            kept: Long tensor ``(B, K)`` of kept positions, ascending in every row.
            targets: Long tensor ``(B, N)``: for each token, the kept position it merges into, or ``-1``.
                Kept tokens must target themselves.
            sizes: Optional sizes ``(B, N)`` of the input tokens (how many originals each stands for).

        Returns:
            The `Reduction`.
        """
        batch, num_tokens = tokens.shape[:2]
        num_kept = kept.shape[1]
        device = tokens.device
        slot_of = torch.full((batch, num_tokens), -1, dtype=torch.long, device=device)
        slot_of.scatter_(1, kept, torch.arange(num_kept, device=device).expand(batch, num_kept))
        assignment = torch.where(targets >= 0, slot_of.gather(1, targets.clamp_min(0)), -1)
        if bool((slot_of.gather(1, kept) != torch.arange(num_kept, device=device)).any()):
            raise InvalidInputError("kept positions must be distinct")
        if bool(((targets >= 0) & (assignment < 0)).any()):
            raise InvalidInputError("every target must be a kept position")
        if bool((assignment.gather(1, kept) != torch.arange(num_kept, device=device)).any()):
            raise InvalidInputError("kept tokens must target themselves")
        weights, slot_sizes = merge_weights(assignment, num_kept, sizes)
        merged = scatter_merge(tokens, assignment, num_kept, weights)
        return cls(merged, kept, slot_sizes.float(), assignment, weights.float())

    @classmethod
    def from_selection(cls, tokens: torch.Tensor, kept: torch.Tensor, sizes: torch.Tensor | None = None) -> Reduction:
        """Build the reduction that keeps the tokens at ``kept`` as they are and drops the rest.

        Args:
            tokens: Tokens of shape ``(B, N, C)``.
            kept: Long tensor ``(B, K)`` of kept positions, ascending in every row.
            sizes: Optional sizes ``(B, N)``; each slot keeps the size of its token.
        """
        batch, num_tokens = tokens.shape[:2]
        device = tokens.device
        assignment = torch.full((batch, num_tokens), -1, dtype=torch.long, device=device)
        assignment.scatter_(1, kept, torch.arange(kept.shape[1], device=device).expand_as(kept))
        weights = (assignment >= 0).float()
        slot_sizes = torch.ones_like(kept, dtype=torch.float32) if sizes is None else sizes.float().gather(1, kept)
        # Gathering keeps the kept tokens bit-identical to the input, which a weighted sum would not in fp16.
        return cls(gather_tokens(tokens, kept), kept, slot_sizes, assignment, weights)

    @classmethod
    def merge_into_nearest(
        cls,
        tokens: torch.Tensor,
        kept: torch.Tensor,
        *,
        allowed: torch.Tensor | None = None,
        sizes: torch.Tensor | None = None,
    ) -> Reduction:
        """Keep the tokens at ``kept`` and merge every other token into its most cosine-similar kept token.

        The "merge what you drop into its nearest survivor" step shared by ApET, MTR and many others.
        ``allowed`` restricts which kept slots may receive merges (ApET: only the high-residual tokens, not the
        basis; MTR: only the Target group; always: not protected tokens, which must stay unchanged). Slots
        become size-weighted means.

        Args:
            tokens: Tokens of shape ``(B, N, C)``.
            kept: Long tensor ``(B, K)`` of kept positions, ascending in every row.
            allowed: Optional bool mask ``(B, K)`` over the kept slots that may receive merges; all of them
                when omitted. In a row where no slot is allowed, the other tokens are dropped.
            sizes: Optional sizes ``(B, N)`` of the input tokens.

        Returns:
            The `Reduction`.
        """
        batch, num_tokens = tokens.shape[:2]
        num_kept = kept.shape[1]
        device = tokens.device
        if allowed is None:
            allowed = torch.ones((batch, num_kept), dtype=torch.bool, device=device)
        elif allowed.shape != (batch, num_kept) or allowed.dtype != torch.bool:
            raise InvalidInputError(f"allowed must be a bool tensor of shape {(batch, num_kept)}")
        can_merge = allowed.any(dim=1, keepdim=True)  # (B, 1)
        # A row without any allowed slot gets all slots allowed for the argmax, then its merges are dropped.
        nearest = assign_to_nearest(tokens, gather_tokens(tokens, kept), target_mask=allowed | ~can_merge)
        targets = torch.where(can_merge, kept.gather(1, nearest), -1)  # (B, N)
        positions = torch.arange(num_tokens, device=device).expand(batch, -1)
        is_kept = torch.zeros((batch, num_tokens), dtype=torch.bool, device=device).scatter_(1, kept, True)
        return cls.from_targets(tokens, kept, torch.where(is_kept, positions, targets), sizes)
