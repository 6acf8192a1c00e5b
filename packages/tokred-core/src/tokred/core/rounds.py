"""`MergeRounds`: the bookkeeping of reducers that remove tokens in several per-row rounds."""

from __future__ import annotations

import torch

from tokred.core.ops.selection import mask_to_indices
from tokred.core.reduction import Reduction

__all__ = ["MergeRounds"]


class MergeRounds:
    """State of a reduction that removes tokens round by round, each row at its own pace.

    Reducers such as ToMe and UTR can remove at most about half the tokens per round, and how many a row can
    remove depends on that row (its protected tokens). Keeping every tensor at full length ``N`` with an
    ``alive`` mask lets each row run its own rounds, so a row's result never depends on the rest of the
    batch; [`finish`][tokred.core.rounds.MergeRounds.finish] then builds one `Reduction` from the original tokens.

    Each alive position holds the size-weighted *sum* of the tokens merged into it (``weighted``), so a
    merge is one row addition; [`means`][tokred.core.rounds.MergeRounds.means] gives the averages when a score needs
    them (cosine similarity does not: it ignores the scale).

    Args:
        tokens: Original tokens ``(B, N, C)``.
        sizes: Optional sizes ``(B, N)`` of the original tokens.

    Attributes:
        alive: Bool ``(B, N)``: positions still holding a token.
        owner: Long ``(B, N)``: the alive position each original token now belongs to, ``-1`` if dropped.
        weighted: fp32 ``(B, N, C)``: size-weighted sums at the alive positions.
        mass: fp32 ``(B, N)``: total size at each alive position.
    """

    def __init__(self, tokens: torch.Tensor, sizes: torch.Tensor | None = None) -> None:
        batch, num_tokens = tokens.shape[:2]
        device = tokens.device
        self.tokens = tokens
        self.sizes = sizes
        self.positions = torch.arange(num_tokens, device=device).expand(batch, -1)
        self.alive = torch.ones((batch, num_tokens), dtype=torch.bool, device=device)
        self.owner = self.positions.clone()
        self.mass = torch.ones((batch, num_tokens), device=device) if sizes is None else sizes.float().clone()
        self.weighted = tokens.float() * self.mass.unsqueeze(-1)  # a fresh tensor this object owns
        self._row_offset = torch.arange(batch, device=device).unsqueeze(1) * num_tokens  # (B, 1)

    def excess(self, num_keep: int) -> torch.Tensor:
        """Tokens each row still has to remove to reach ``num_keep``, shape ``(B,)``."""
        return self.alive.sum(dim=1) - num_keep

    def means(self) -> torch.Tensor:
        """Size-weighted means ``(B, N, C)`` at the alive positions (meaningless elsewhere)."""
        return self.weighted / self.mass.unsqueeze(-1)

    def remove(self, sources: torch.Tensor, destinations: torch.Tensor) -> None:
        """Remove ``sources``, merging each into its destination or dropping it.

        Args:
            sources: Long ``(B, R)`` alive positions to remove; ``-1`` pads rows that remove fewer.
            destinations: Long ``(B, R)``: the alive position each source merges into, ``-1`` to drop it.
                Destinations must not be removed in the same call.
        """
        batch, num_tokens = self.alive.shape
        valid = sources >= 0
        merging = valid & (destinations >= 0)
        flat_src = (sources + self._row_offset)[merging]
        flat_dst = (destinations + self._row_offset)[merging]
        channels = self.weighted.shape[-1]
        self.weighted.view(-1, channels).index_add_(0, flat_dst, self.weighted.view(-1, channels)[flat_src])
        self.mass.view(-1).index_add_(0, flat_dst, self.mass.view(-1)[flat_src])
        # Padding writes into a spare column N, so it can never collide with a real source.
        src = torch.where(valid, sources, num_tokens)
        step = torch.cat([self.positions, self.positions.new_full((batch, 1), -1)], dim=1)  # (B, N + 1)
        step.scatter_(1, src, torch.where(merging, destinations, -1))  # source -> destination (-1: dropped)
        removed = torch.zeros((batch, num_tokens + 1), dtype=torch.bool, device=self.alive.device)
        removed.scatter_(1, src, True)
        self.alive &= ~removed[:, :num_tokens]
        self.owner = torch.where(self.owner >= 0, step[:, :num_tokens].gather(1, self.owner.clamp_min(0)), -1)

    def finish(self, num_keep: int) -> Reduction:
        """The `Reduction` from the original tokens to the ``num_keep`` alive ones (every row must be there)."""
        kept = mask_to_indices(self.alive, num_keep)
        return Reduction.from_targets(self.tokens, kept, self.owner, self.sizes)
