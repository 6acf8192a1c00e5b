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

from tokred.core.errors import AttachError, UnsupportedError
from tokred.core.reducer import Reducer
from tokred.core.reduction import Reduction
from tokred.vlm.hooks.groups import reduce_groups
from tokred.vlm.hooks.placeholders import VisualTokens
from tokred.vlm.models.base import Positions
from tokred.vlm.results import GroupPlan, PrefillStats
from tokred.vlm.sequence import compact_positions, decode_positions, padding_mask_from, survivor_index

__all__ = ["STATE_ATTRIBUTE", "PrefillResult", "SequenceState", "reduce_prefill", "sequence_state", "translate_decode"]

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


@dataclass
class PrefillResult:
    """What one reduced prefill produced besides the new decoder arguments."""

    stats: PrefillStats
    plans: list[GroupPlan] | None


def cache_of(kwargs: dict[str, Any]) -> tuple[str, Any]:
    """The decoder's cache argument: ``cache`` in transformers 5, ``past_key_values`` before it is removed."""
    key = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
    return key, kwargs.get(key)


def sequence_state(cache: Any, owner: int) -> SequenceState | None:
    """The state a reduced prefill of attachment ``owner`` left on ``cache``, or None."""
    state = getattr(cache, STATE_ATTRIBUTE, None) if cache is not None else None
    return state if isinstance(state, SequenceState) and state.owner == owner else None


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
    valid = padding_mask_from(kwargs.get("attention_mask"), batch, length, device)
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
        embeds = flat_embeds.view(batch, length, width)
        survive[flat_index] = keep
    survive = survive.view(batch, length) & valid
    index, new_mask = survivor_index(survive, valid)

    original = kwargs.get("position_ids")
    if original is None:
        original = torch.arange(length, device=device).expand(batch, length)
    if positions == "compact":
        group_ids = torch.full((batch * length,), -1, dtype=torch.long, device=device)
        group_ids[flat_index] = group
        original = compact_positions(original, survive, valid, group_ids.view(batch, length))
    gather = index.expand(original.shape[0], *index.shape) if original.dim() == 3 else index
    new_positions = original.gather(-1, gather)

    kwargs["inputs_embeds"] = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, width))
    kwargs["attention_mask"] = new_mask.long()
    kwargs["position_ids"] = new_positions
    use_cache = kwargs.get("use_cache")
    if use_cache is None:  # the decoder resolves it from its config later; decide the same way here
        use_cache = getattr(decoder.config, "use_cache", False)
    cache_key, cache = cache_of(kwargs)
    if use_cache and cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=decoder.config)
        kwargs[cache_key] = cache
    if cache is not None:
        state = SequenceState(owner, new_mask.long(), index.shape[1], length, new_positions[..., -1:].clone())
        setattr(cache, STATE_ATTRIBUTE, state)
    num_visual = int(flat_index.numel())
    kept_visual = int(survive.reshape(-1)[flat_index].sum())
    stats = PrefillStats(length, index.shape[1], num_visual, kept_visual, int(group.max()) + 1 if num_visual else 0)
    plans = None
    if record_plans:
        plans = []
        for slot in visual.plans:
            plan = slot.plan if llm_plans is None else llm_plans.get(slot.group_id)
            if plan is not None:
                plans.append(GroupPlan(slot.modality, slot.image, slot.group, plan))
    return kwargs, PrefillResult(stats, plans)


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
