"""What an attached model reports about its last reduced prefill: statistics and, on request, the plans."""

from __future__ import annotations

from dataclasses import dataclass

from tokred.core.reduction import Reduction

__all__ = ["GroupPlan", "PrefillStats"]


@dataclass(frozen=True)
class PrefillStats:
    """What the last reduced prefill did, for the whole batch (``handle.last_stats``).

    Lengths are those of the padded batch (the longest row); counts are totals over all rows.

    Attributes:
        original_length: Padded sequence length the model would have processed, ``L``.
        reduced_length: Padded sequence length after reduction, ``L'`` (the logits' length).
        visual_tokens: Visual placeholder tokens in the batch.
        kept_visual_tokens: Visual tokens that survived (structural tokens included).
        groups: Token groups reduced (images, crops or frames).
    """

    original_length: int
    reduced_length: int
    visual_tokens: int
    kept_visual_tokens: int
    groups: int

    @property
    def kept_per_group(self) -> float:
        """Visual tokens kept per group, on average (structural tokens included)."""
        return self.kept_visual_tokens / self.groups if self.groups else 0.0


@dataclass(frozen=True)
class GroupPlan:
    """The reducer's plan for one token group of the last reduced prefill (``attach(..., record_plans=True)``).

    Attributes:
        modality: ``"image"`` or ``"video"``.
        image: Index of the image (or video) among the call's inputs of that modality, in input order (the
            order of ``pixel_values``), counted over the whole batch.
        group: Index of the group within that image or video: the anyres crop or the frame; 0 for an image
            that is a single group (LLaVA-1.5).
        reduction: The plan, a batch of one: ``indices`` ``(1, K)`` and ``assignment`` ``(1, N)`` over the group's
            ``N`` reduced tokens, and ``tokens`` ``(1, K, C)`` in the space the reducer ran in. With
            ``space="vision"`` the tokens are the vision tower's patches of the image, crop or frame, row-major
            (before any anyres unpadding), and ``C`` is the vision width; with ``space="llm"`` they are the group's
            placeholder tokens in sequence order, and ``C`` is the decoder width.
    """

    modality: str
    image: int
    group: int
    reduction: Reduction
