"""Inner stages: reducing the surviving visual tokens again inside the language model, after decoder layer ``L``.

``attach(model, reducer, layers={L: reducer_L})`` puts a forward pre-hook on every decoder layer from the
first inner stage on. The decoder pre-hook (after the first stage's surgery) opens a per-call
[`StageContext`][tokred.vlm.hooks.stages.StageContext]: the 2-D mask the decoder works with and, at the
prefill, which columns are visual tokens of which group. The pre-hook of layer ``L`` — whose input is the
output of the first ``L`` layers — runs ``reducer_L`` on each group's hidden states, shortens the hidden
states, gathers the kept tokens' rotary tables and position ids, and builds the short layers' masks with
``create_causal_mask(..., layer_idx=L)``, which sizes them on cache layer ``L`` (a cache keeps one length per
layer, so the layers from ``L`` on hold a shorter KV cache). Every later layer gets those short arguments in
place of the decoder's. A [`StageState`][tokred.vlm.hooks.stages.StageState] per stage on the cache lets
decode steps rebuild the short mask (and, with compact positions, the positions).

The decoder computes one mask and one rotary table per forward and passes them to every layer as keyword
arguments, and every transformers 5 decoder passes the hidden states positionally; that is all this relies on.
Shapes: ``B`` rows, ``Lc`` the sequence length entering a stage, ``Ls`` after it, ``C`` width, ``q`` tokens of
a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokred.core.reducer import Reducer
from tokred.vlm.hooks.groups import reduce_groups
from tokred.vlm.results import StageStats
from tokred.vlm.sequence import compact_positions, decode_positions, padding_mask_from, survivor_index

__all__ = [
    "STAGES_ATTRIBUTE",
    "InnerStage",
    "ShortArguments",
    "StageContext",
    "StageState",
    "enter_stage",
    "has_stage_states",
    "layer_types",
    "open_context",
]

STAGES_ATTRIBUTE = "_tokred_vlm_stages"
"""Attribute of the cache that carries the inner stages' [`StageState`][tokred.vlm.hooks.stages.StageState]s."""

TEXT = -2
"""Group id of a column that is no visual token (text or padding) in a
[`StageContext`][tokred.vlm.hooks.stages.StageContext]."""


@dataclass(frozen=True)
class InnerStage:
    """One inner stage of a schedule.

    Attributes:
        layer: The first decoder layer (0-based) that sees the shorter sequence: the stage runs on the output of
            the first ``layer`` layers.
        reducer: Reduces each group's surviving visual tokens, on the language model's hidden states.
    """

    layer: int
    reducer: Reducer


@dataclass
class StageState:
    """Kept on the cache for every inner stage that dropped tokens at the prefill.

    Attributes:
        owner: Id of the attachment.
        mask: Long ``(B, Ls)``: 1 for real tokens of the stage's prefill.
        prefill_length: ``Ls``.
        last_position: ``(B, 1)`` the last prefill position of each row in the stage's positions (compact
            positions only; with original positions decode positions are the decoder's own).
    """

    owner: int
    mask: torch.Tensor
    prefill_length: int
    last_position: torch.Tensor | None


@dataclass
class ShortArguments:
    """The keyword arguments the layers of a stage get in place of the decoder's.

    Attributes:
        masks: The attention mask per layer type (``"full_attention"``, ``"sliding_attention"``).
        position_embeddings: The rotary ``(cos, sin)`` tables of the short sequence.
        position_ids: The short sequence's position ids, or None where the decoder passed none.
    """

    masks: dict[str, Any]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor | None


@dataclass
class StageContext:
    """The per-call state of the inner stages, from the decoder pre-hook to the end of the decoder's forward.

    Attributes:
        prefill: Whether this call is a prefill (no reduced cache to continue).
        mask: Bool ``(B, Lc)`` real tokens of the sequence entering the next stage (prefill), or the decoder's
            2-D mask for the step (decode; None when the decoder got none or a 4-D mask).
        group: Long ``(B, Lc)`` at prefill: the group of every visual token, ``-1`` for structural tokens,
            ``TEXT`` elsewhere.
        columns: Long ``(B, Lc)`` at prefill: the column of the decoder's input that every current column holds
            (for gathering labels with every stage's plan).
        short: The arguments of the layers from the last entered stage on, or None before any stage shortened.
        stats: One entry per stage that ran in this prefill.
    """

    prefill: bool
    mask: torch.Tensor | None
    group: torch.Tensor | None = None
    columns: torch.Tensor | None = None
    short: ShortArguments | None = None
    stats: list[StageStats] = field(default_factory=list)


def has_stage_states(cache: Any, owner: int) -> bool:
    """Whether ``cache`` continues a prefill of attachment ``owner`` whose inner stages dropped tokens."""
    states = getattr(cache, STAGES_ATTRIBUTE, None) if cache is not None else None
    return isinstance(states, dict) and any(state.owner == owner for state in states.values())


def layer_types(decoder: torch.nn.Module) -> list[str]:
    """The attention type of every decoder layer (configs without ``layer_types`` are all full attention)."""
    count = len(decoder.layers)
    types = getattr(decoder.config, "layer_types", None)
    return list(types)[:count] if types else ["full_attention"] * count


def _gather_sequence(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``table (..., B|1, L, D)`` along its sequence axis (-2) at ``index (B, Ls)``."""
    batch, short = index.shape
    table = table.expand(*table.shape[:-3], batch, *table.shape[-2:])
    gather = index.view(*([1] * (table.dim() - 3)), batch, short, 1).expand(*table.shape[:-2], short, table.shape[-1])
    return table.gather(-2, gather)


def _masks(
    decoder: torch.nn.Module, types: list[str], layer: int, embeds: torch.Tensor, mask: torch.Tensor, cache: Any
) -> dict[str, Any]:
    """The short layers' mask of every layer type, sized on the first layer of that type from ``layer`` on."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    masks: dict[str, Any] = {}
    for index in range(layer, len(types)):
        kind = types[index]
        if kind in masks:
            continue
        build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        masks[kind] = build(
            config=decoder.config, inputs_embeds=embeds, attention_mask=mask, cache=cache, layer_idx=index
        )
    return masks


def enter_stage(
    decoder: torch.nn.Module,
    stage: InnerStage,
    context: StageContext,
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    *,
    types: list[str],
    owner: int,
    positions: str,
) -> torch.Tensor | None:
    """Run one inner stage at its entry layer; update ``context.short`` for the layers from it on.

    Args:
        decoder: The language decoder (its config, layers and rotary embedding).
        stage: The stage.
        context: The call's context (updated in place).
        hidden: ``(B, Lc, C)`` the entry layer's input, the output of the layers before it.
        kwargs: The entry layer's keyword arguments (``position_embeddings``, ``position_ids``, the cache).
        types: The attention type of every decoder layer ([`layer_types`][tokred.vlm.hooks.stages.layer_types]).
        owner: Id of the attachment, stamped on the cache state.
        positions: ``"original"`` or ``"compact"``.

    Returns:
        The shortened hidden states ``(B, Ls, C)`` at a prefill that dropped tokens, else None.

    With original positions a decode step's positions are the decoder's own in every stage (they never depend
    on a stage's cache length); with compact ones they continue from the stage's last prefill position.
    """
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    current = context.short
    embeddings = current.position_embeddings if current is not None else kwargs["position_embeddings"]
    position_ids = current.position_ids if current is not None else kwargs.get("position_ids")
    if context.prefill:
        return _enter_prefill(decoder, stage, context, hidden, embeddings, position_ids, cache, types, owner, positions)
    states = getattr(cache, STAGES_ATTRIBUTE, None) if cache is not None else None
    state = states.get(stage.layer) if isinstance(states, dict) else None
    if state is None or state.owner != owner:
        return None  # this stage dropped nothing at the prefill
    steps = hidden.shape[1]
    past = int(cache.get_seq_length(stage.layer))
    tail = past + steps - state.prefill_length
    decoded = context.mask
    if isinstance(decoded, torch.Tensor) and decoded.dim() == 2 and decoded.shape[1] >= tail:
        extra = decoded[:, decoded.shape[1] - tail :].to(state.mask)
    else:
        extra = torch.ones((hidden.shape[0], tail), dtype=state.mask.dtype, device=state.mask.device)
    mask = torch.cat([state.mask, extra], dim=1)
    if positions == "compact":
        position_ids = decode_positions(state.last_position, past, state.prefill_length, steps)
        embeddings = decoder.rotary_emb(hidden, position_ids)
    context.short = ShortArguments(_masks(decoder, types, stage.layer, hidden, mask, cache), embeddings, position_ids)
    return None


def _enter_prefill(
    decoder: torch.nn.Module,
    stage: InnerStage,
    context: StageContext,
    hidden: torch.Tensor,
    embeddings: tuple[torch.Tensor, torch.Tensor],
    position_ids: torch.Tensor | None,
    cache: Any,
    types: list[str],
    owner: int,
    positions: str,
) -> torch.Tensor | None:
    batch, length, width = hidden.shape
    valid = context.mask
    group = context.group
    assert valid is not None and group is not None  # a prefill context always has them
    flat = torch.nonzero(((group >= -1) & valid).reshape(-1)).squeeze(1)
    merged, keep = reduce_groups(stage.reducer, hidden.reshape(-1, width)[flat], group.reshape(-1)[flat])
    survive = valid.clone().reshape(-1)
    survive[flat] = keep
    survive = survive.view(batch, length) & valid
    kept_visual = int(survive.reshape(-1)[flat].sum())
    if bool(torch.equal(survive, valid)):
        context.stats.append(StageStats(stage.layer, length, kept_visual))
        return None
    index, new_mask = survivor_index(survive, valid)
    flat_hidden = hidden.reshape(-1, width).clone()
    flat_hidden[flat] = merged.to(flat_hidden.dtype)
    short_hidden = flat_hidden.view(batch, length, width).gather(1, index.unsqueeze(-1).expand(-1, -1, width))
    long_ids = position_ids.expand(batch, -1) if position_ids is not None else None
    if positions == "compact":
        if long_ids is None:
            long_ids = torch.arange(length, device=hidden.device).expand(batch, length)
        short_ids = compact_positions(long_ids, survive, valid, None).gather(1, index)
        short_embeddings = decoder.rotary_emb(short_hidden, short_ids)
    else:
        short_ids = long_ids.gather(1, index) if long_ids is not None else None
        short_embeddings = tuple(_gather_sequence(table, index) for table in embeddings)
    mask = new_mask.long()
    if cache is not None:
        states = getattr(cache, STAGES_ATTRIBUTE, None)
        if not isinstance(states, dict):
            states = {}
            setattr(cache, STAGES_ATTRIBUTE, states)
        last = short_ids[:, -1:].clone() if positions == "compact" else None
        states[stage.layer] = StageState(owner, mask, index.shape[1], last)
    context.short = ShortArguments(
        _masks(decoder, types, stage.layer, short_hidden, mask, cache), short_embeddings, short_ids
    )
    context.mask = new_mask
    context.group = torch.where(new_mask, group.gather(1, index), TEXT)
    if context.columns is not None:
        context.columns = context.columns.gather(1, index)
    context.stats.append(StageStats(stage.layer, index.shape[1], kept_visual))
    return short_hidden


def open_context(
    kwargs: dict[str, Any], batch: int, length: int, device: torch.device, *, prefill: bool, group: torch.Tensor | None
) -> StageContext:
    """The context of one decoder call, from the keyword arguments the decoder will run with.

    Args:
        kwargs: The decoder's keyword arguments (after the first stage's surgery).
        batch: ``B``.
        length: The sequence length the decoder gets.
        device: The hidden states' device.
        prefill: Whether this is a prefill.
        group: ``(B, length)`` group ids at a prefill (``TEXT`` for non-visual columns), else None.
    """
    mask = kwargs.get("attention_mask")
    if prefill:
        valid = padding_mask_from(mask, batch, length, device)
        columns = torch.arange(length, device=device).expand(batch, length)
        return StageContext(True, valid, torch.where(valid, group, TEXT) if group is not None else None, columns)
    return StageContext(False, mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)
