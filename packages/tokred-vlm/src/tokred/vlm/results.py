"""What an attached model reports about its last reduced prefill: statistics and, on request, the plans."""

from __future__ import annotations

from dataclasses import dataclass

from tokred.core.reduction import Reduction

__all__ = ["GroupPlan", "PrefillStats", "StageStats"]


@dataclass(frozen=True)
class StageStats:
    """What one inner stage did at the last prefill.

    Attributes:
        layer: The stage's first short layer.
        length: Padded sequence length from that layer on.
        kept_visual_tokens: Visual tokens left from that layer on (structural tokens included), over the batch.
    """

    layer: int
    length: int
    kept_visual_tokens: int


@dataclass(frozen=True)
class PrefillStats:
    """What the last reduced prefill did, for the whole batch (``handle.last_stats``).

    Lengths are those of the padded batch (the longest row); counts are totals over all rows.

    Attributes:
        original_length: Padded sequence length the model would have processed, ``L``.
        reduced_length: Padded sequence length after reduction, ``L'`` (the logits' length).
        visual_tokens: Visual placeholder tokens in the batch.
        kept_visual_tokens: Visual tokens that survived the first stage (structural tokens included).
        groups: Token groups reduced (images, crops or frames).
        batch: Rows of the batch.
        stages: One [`StageStats`][tokred.vlm.StageStats] per inner stage (``attach(..., layers=...)``), in
            layer order; empty for a single-stage schedule.
        num_layers: Decoder layers of the model (0 when not recorded).
        decoder_flops: Floating-point operations of the decoder layers at this prefill, as run (projections,
            attention over the whole padded sequence, MLP; embeddings and the LM head not counted).
        dense_decoder_flops: The same for the unreduced sequence.
    """

    original_length: int
    reduced_length: int
    visual_tokens: int
    kept_visual_tokens: int
    groups: int
    batch: int = 1
    stages: tuple[StageStats, ...] = ()
    num_layers: int = 0
    decoder_flops: int = 0
    dense_decoder_flops: int = 0

    @property
    def kept_per_group(self) -> float:
        """Visual tokens kept per group after the first stage, on average (structural tokens included)."""
        return self.kept_visual_tokens / self.groups if self.groups else 0.0

    @property
    def layer_lengths(self) -> tuple[int, ...]:
        """The padded sequence length each decoder layer processed (empty when ``num_layers`` is 0)."""
        return self._per_layer(self.reduced_length, [(s.layer, s.length) for s in self.stages])

    @property
    def layer_visual_tokens(self) -> tuple[int, ...]:
        """The visual tokens (batch total) each decoder layer processed."""
        return self._per_layer(self.kept_visual_tokens, [(s.layer, s.kept_visual_tokens) for s in self.stages])

    @property
    def average_visual_tokens(self) -> float:
        """Visual tokens per group averaged over the decoder layers: the paper's "average token count".

        ApET's 96 tokens in layers 1–16 and 32 in layers 17–32 average 64; single-stage, it equals
        [`kept_per_group`][tokred.vlm.results.PrefillStats.kept_per_group].
        """
        per_layer = self.layer_visual_tokens
        if not per_layer or not self.groups:
            return self.kept_per_group
        return sum(per_layer) / len(per_layer) / self.groups

    def _per_layer(self, first: int, changes: list[tuple[int, int]]) -> tuple[int, ...]:
        values, current, at = [], first, dict(changes)
        for layer in range(self.num_layers):
            current = at.get(layer, current)
            values.append(current)
        return tuple(values)


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
