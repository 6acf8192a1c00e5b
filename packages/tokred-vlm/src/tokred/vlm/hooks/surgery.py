"""Sequence surgery at the language model's input: the reduced prefill, and decode steps that follow it.

At the prefill the decoder receives the merged embeddings, the positions the model computed (Qwen's 3-D
M-RoPE included) and the mask. [`reduce_prefill`][tokred.vlm.hooks.surgery.reduce_prefill] runs the reducer on
each group of visual tokens (unless vision space already did), drops the removed tokens from the embeddings,
the positions and the mask, and stores a small [`SequenceState`][tokred.vlm.hooks.surgery.SequenceState] on the
cache. ``generate`` still describes every later step in original coordinates;
[`translate_decode`][tokred.vlm.hooks.surgery.translate_decode] rewrites its mask and positions from that state.
The state lives on the cache object, so it follows the sequence (``outputs.cache``, generate's model kwargs)
and never mixes two sequences.

Shapes: ``B`` rows, ``L`` original length, ``L'`` reduced length, ``C`` decoder width, ``T`` visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokred.core.errors import AttachError, InvalidInputError, UnsupportedError
from tokred.core.reducer import Reducer
from tokred.core.reduction import Reduction
from tokred.vlm.hooks.groups import reduce_groups
from tokred.vlm.hooks.placeholders import VisualTokens
from tokred.vlm.hooks.stages import STAGES_ATTRIBUTE, TEXT
from tokred.vlm.models.base import Positions
from tokred.vlm.results import GroupPlan, PrefillStats
from tokred.vlm.sequence import (
    compact_positions,
    decode_positions,
    packed_segments,
    padding_mask_from,
    survivor_index,
)

__all__ = [
    "IGNORE_INDEX",
    "STATE_ATTRIBUTE",
    "PrefillResult",
    "SequenceState",
    "Survivors",
    "forget_states",
    "reduce_prefill",
    "sequence_state",
    "skip_cached_tokens",
    "translate_decode",
]

STATE_ATTRIBUTE = "_tokred_vlm_state"
"""Attribute of the cache that carries the [`SequenceState`][tokred.vlm.hooks.surgery.SequenceState]."""


@dataclass
class SequenceState:
    """Kept on the cache between a reduced prefill and the decode steps that follow it.

    Attributes:
        owner: Id of the attachment that reduced the prefill.
        mask: Long ``(B, L')``: 1 for real tokens of the reduced prefill.
        prefill_length: ``L'``.
        original_length: ``L``.
        last_position: ``(..., B, 1)`` the last prefill position of every row, in the row layout of the positions.
    """

    owner: int
    mask: torch.Tensor
    prefill_length: int
    original_length: int
    last_position: torch.Tensor


IGNORE_INDEX = -100
"""The label transformers' losses ignore; padding columns of a reduced sequence get it."""


@dataclass
class Survivors:
    """Which original columns a reduced prefill kept, for gathering per-token tensors such as labels.

    Attributes:
        index: Long ``(B, L')``: the original column of each reduced column.
        mask: Bool ``(B, L')``: True where the reduced column holds a real token, False for padding.
    """

    index: torch.Tensor
    mask: torch.Tensor

    def gather_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` labels (or shifted labels) of the full sequence as ``(B, L')`` labels of the reduced one.

        Every kept token keeps its own label; padding columns get
        [`IGNORE_INDEX`][tokred.vlm.hooks.surgery.IGNORE_INDEX].
        """
        if labels.dim() != 2 or labels.shape[0] != self.index.shape[0] or labels.shape[1] < int(self.index.max()) + 1:
            raise InvalidInputError(
                f"labels of shape {tuple(labels.shape)} do not match the prompt ({self.index.shape[0]} rows); pass "
                "one label per input token, with the ignore index (-100) on visual placeholders"
            )
        index = self.index.to(labels.device)
        gathered = labels.gather(1, index)
        return gathered.masked_fill(~self.mask.to(labels.device), IGNORE_INDEX)


@dataclass
class PrefillResult:
    """What one prefill produced besides the new decoder arguments.

    Attributes:
        stats: Lengths and visual tokens before and after.
        plans: With ``record_plans``, every group's plan.
        survivors: The kept columns, or None when nothing was dropped (the sequence was left as it was).
        groups: Long ``(B, L')``: the group of every visual token of the decoder's sequence, ``-1`` for
            structural tokens, ``-2`` for text and padding (what inner stages reduce).
    """

    stats: PrefillStats
    plans: list[GroupPlan] | None
    survivors: Survivors | None
    groups: torch.Tensor


def cache_of(kwargs: dict[str, Any]) -> tuple[str, Any]:
    """The decoder's cache argument: ``cache`` in transformers 5, ``past_key_values`` before it is removed."""
    key = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
    return key, kwargs.get(key)


def sequence_state(cache: Any, owner: int) -> SequenceState | None:
    """The state a reduced prefill of attachment ``owner`` left on ``cache``, or None."""
    state = getattr(cache, STATE_ATTRIBUTE, None) if cache is not None else None
    return state if isinstance(state, SequenceState) and state.owner == owner else None


def forget_states(cache: Any) -> None:
    """Remove what a reduced prefill left on ``cache``, once the cache is emptied for another sequence.

    A cache object can outlive its sequence (``StaticCache.reset()``, a cache passed to ``generate`` again); the
    state of the last sequence must not re-map the next one's positions.
    """
    for name in (STATE_ATTRIBUTE, STAGES_ATTRIBUTE):
        if name in vars(cache):
            delattr(cache, name)


def reduce_prefill(
    decoder: torch.nn.Module,
    kwargs: dict[str, Any],
    visual: VisualTokens,
    reducer: Reducer,
    *,
    owner: int,
    positions: Positions,
    record_plans: bool,
) -> tuple[dict[str, Any], PrefillResult]:
    """Shorten the decoder's prefill arguments to the surviving tokens.

    Args:
        decoder: The language model (its config decides ``use_cache`` when the call leaves it open).
        kwargs: The decoder's keyword arguments (``inputs_embeds``, ``attention_mask``, ``position_ids``, the
            cache, …); a new dict is returned.
        visual: The call's visual tokens.
        reducer: Runs on each group's embeddings unless vision space already reduced them.
        owner: Id of the attachment, stamped on the cache state.
        positions: ``"original"`` keeps every kept token's position; ``"compact"`` closes the gaps.
        record_plans: Return every group's plan.

    Returns:
        The new keyword arguments and what the prefill kept.

    Raises:
        AttachError: If the decoder received another sequence than the base model saw.
    """
    kwargs = dict(kwargs)
    embeds = kwargs["inputs_embeds"]
    batch, length, width = embeds.shape
    device = embeds.device
    if length != visual.length:
        raise AttachError(f"decoder received {length} tokens, expected {visual.length}")
    incoming_mask = kwargs.get("attention_mask")
    valid = padding_mask_from(incoming_mask, batch, length, device)
    flat_index = visual.flat_index.to(device)
    group = visual.group.to(device)
    survive = valid.clone().reshape(-1)
    llm_plans: dict[int, Reduction] | None = {} if record_plans and visual.keep is None else None
    if visual.keep is not None:  # reduced in vision space already
        survive[flat_index] = visual.keep.to(device)
    else:
        flat_embeds = embeds.reshape(batch * length, width)
        merged, keep = reduce_groups(reducer, flat_embeds[flat_index], group, llm_plans)
        flat_embeds = flat_embeds.clone()
        flat_embeds[flat_index] = merged
        kwargs["inputs_embeds"] = embeds = flat_embeds.view(batch, length, width)
        survive[flat_index] = keep
    survive = survive.view(batch, length) & valid
    num_visual = int(flat_index.numel())
    kept_visual = int(survive.reshape(-1)[flat_index].sum())
    num_groups = int(group.max()) + 1 if num_visual else 0
    plans = _collect_plans(visual, llm_plans) if record_plans else None
    column_groups = torch.full((batch * length,), TEXT, dtype=torch.long, device=device)
    column_groups[flat_index] = group
    column_groups = column_groups.view(batch, length)
    if kept_visual == num_visual:
        # Nothing dropped: the model runs exactly as it would unattached (mask, positions, padding, cache).
        stats = PrefillStats(length, length, num_visual, kept_visual, num_groups, batch)
        return kwargs, PrefillResult(stats, plans, None, torch.where(valid, column_groups, TEXT))

    index, new_mask = survivor_index(survive, valid)
    original = kwargs.get("position_ids")
    if original is None:
        original = torch.arange(length, device=device).expand(batch, length)
    cache_key, cache = cache_of(kwargs)
    use_cache = kwargs.get("use_cache")
    if use_cache is None:  # the decoder resolves it from its config later; decide the same way here
        use_cache = getattr(decoder.config, "use_cache", False)
    # transformers reads packed (padding-free) sequences off restarting positions, but only without a mask and a
    # cache; the reduced call keeps that form, with each sequence's positions free of gaps.
    segments = packed_segments(original, valid) if incoming_mask is None and cache is None and not use_cache else None
    if segments is not None and original.dim() == 2 and positions == "original":
        raise UnsupportedError(
            "packed (padding-free) input with positions='original': the gaps left by dropped tokens would read as "
            "sequence boundaries; attach with positions='compact', or pass an attention_mask instead of packing"
        )
    if positions == "compact":
        group_ids = torch.full((batch * length,), -1, dtype=torch.long, device=device)
        group_ids[flat_index] = group
        original = compact_positions(original, survive, valid, group_ids.view(batch, length), segments=segments)
    elif segments is not None:  # the text row of M-RoPE positions only marks sequences; make it gap-free
        original = original.clone()
        original[0] = compact_positions(original[0], survive, valid, None, segments=segments)
    gather = index.expand(original.shape[0], *index.shape) if original.dim() == 3 else index
    new_positions = original.gather(-1, gather)

    kwargs["inputs_embeds"] = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, width))
    kwargs["position_ids"] = new_positions
    if segments is not None and bool(new_mask.all()):
        kwargs["attention_mask"] = None  # so the decoder finds the packed sequences again
    else:
        kwargs["attention_mask"] = new_mask.long()
    if use_cache and cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=decoder.config)
        kwargs[cache_key] = cache
    if cache is not None:
        state = SequenceState(owner, new_mask.long(), index.shape[1], length, new_positions[..., -1:].clone())
        setattr(cache, STATE_ATTRIBUTE, state)
    stats = PrefillStats(length, index.shape[1], num_visual, kept_visual, num_groups, batch)
    groups = torch.where(new_mask, column_groups.gather(1, index), TEXT)
    return kwargs, PrefillResult(stats, plans, Survivors(index, new_mask), groups)


def _collect_plans(visual: VisualTokens, llm_plans: dict[int, Reduction] | None) -> list[GroupPlan]:
    plans = []
    for slot in visual.plans:
        plan = slot.plan if llm_plans is None else llm_plans.get(slot.group_id)
        if plan is not None:
            plans.append(GroupPlan(slot.modality, slot.image, slot.group, plan))
    return plans


def skip_cached_tokens(kwargs: dict[str, Any], state: SequenceState, past: int) -> dict[str, Any]:
    """Drop the tokens a continued call passes again although the reduced cache holds them already.

    ``generate`` continuing from a returned cache slices the full sequence at the cache's length, which counts
    the reduced prefill; the first ``L - L'`` tokens it passes are then already in the cache. Such a call is
    recognised by its 2-D attention mask, which covers the whole sequence in original coordinates: it is as
    long as the cache plus the tokens passed, where a normal decode step's is ``L - L'`` longer.

    Args:
        kwargs: The base model's keyword arguments of this call.
        state: The state the reduced prefill left on the cache.
        past: The number of tokens the cache holds (``L'`` plus the decode steps so far).

    Returns:
        ``kwargs`` with ``input_ids`` / ``inputs_embeds`` and the per-token arguments cut to the new tokens.

    Raises:
        InvalidInputError: If the call passes nothing beyond what the cache holds.
    """
    offset = state.original_length - state.prefill_length
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    if tokens is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or offset <= 0:
        return kwargs
    num_new = tokens.shape[1]
    if mask.shape[1] != past + num_new:
        return kwargs  # a decode step in original coordinates, as generate's own loop makes them
    if num_new <= offset:
        raise InvalidInputError(
            f"this call passes {num_new} tokens and its attention mask covers {mask.shape[1]}, all of which the "
            "reduced cache holds already; pass at least one new token"
        )
    kwargs = dict(kwargs)
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key][:, offset:]
    for key in ("position_ids", "token_type_ids", "mm_token_type_ids"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.shape[-1] == num_new:
            kwargs[key] = value[..., offset:]
    return kwargs


def translate_decode(kwargs: dict[str, Any], state: SequenceState, cache: Any) -> dict[str, Any]:
    """Rewrite a decode step's mask and positions from original coordinates into the reduced sequence's.

    The mask is the reduced prefill's mask followed by the step's own columns for everything decoded since; the
    positions continue from the last prefill position, ignoring what ``generate`` passed (it counts the
    dropped tokens too), so manual loops with ``position_ids=None`` are right as well.

    Raises:
        UnsupportedError: If the batch changed since the prefill.
    """
    kwargs = dict(kwargs)
    embeds = kwargs["inputs_embeds"]
    batch, num_new = embeds.shape[:2]
    if batch != state.mask.shape[0]:
        raise UnsupportedError(
            f"the cache holds {state.mask.shape[0]} reduced rows but this step has {batch}; tokred.vlm does "
            "not support changing the batch of a reduced cache"
        )
    past = int(cache.get_seq_length())
    tail = past + num_new - state.prefill_length
    incoming = kwargs.get("attention_mask")
    mask = state.mask.to(embeds.device)
    if isinstance(incoming, torch.Tensor) and incoming.dim() == 2 and incoming.shape[1] >= tail:
        extra = incoming[:, incoming.shape[1] - tail :].to(mask.dtype)
    else:
        extra = torch.ones((batch, tail), dtype=mask.dtype, device=mask.device)
    kwargs["attention_mask"] = torch.cat([mask, extra], dim=1)
    kwargs["position_ids"] = decode_positions(
        state.last_position.to(embeds.device), past, state.prefill_length, num_new
    )
    return kwargs
