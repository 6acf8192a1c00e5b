"""Sequence bookkeeping for a shortened prefill: which columns survive, their masks and their positions.

These are pure tensor functions with no knowledge of any model; [`tokred.vlm.attachment`][tokred.vlm.attachment] calls
them from its hooks and the tests check them against hand-written cases. Shapes: ``B`` rows, ``L`` original sequence
length, ``L'`` reduced length, ``R`` position rows (1 for ordinary RoPE, 3 for M-RoPE, 4 for transformers' 4-row M-RoPE
layout whose first row is the text position).
"""

from __future__ import annotations

import itertools

import torch

from tokred.core.errors import UnsupportedError

__all__ = [
    "compact_positions",
    "decode_positions",
    "packed_segments",
    "padding_mask_from",
    "survivor_index",
]


def survivor_index(survive: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the reduced sequence: every surviving token, in order, aligned like the input's padding.

    Left-padded input (or unpadded input) gives right-aligned survivors, so padding stays on the left as
    ``generate`` expects; right-padded input gives left-aligned survivors. When nothing is dropped and no column
    is padding in every row, the index is the identity, which keeps the keep-all case bit-identical.

    Args:
        survive: Bool ``(B, L)``, the tokens that stay (text and kept visual tokens, not padding).
        valid: Bool ``(B, L)``, the non-padding tokens of the input.

    Returns:
        ``(index, mask)``: ``index (B, L')`` the original column of each reduced column, and ``mask (B, L')``
        bool, True where the reduced column holds a surviving token (False where it is padding).
    """
    length = survive.shape[1]
    kept = int(survive.sum(dim=1).max()) if survive.numel() else 0
    right_padded = bool(valid[:, 0].all()) and not bool(valid[:, -1].all())
    # A stable sort keeps each class in its original order; which class sorts first sets the padding side.
    key = (~survive if right_padded else survive).to(torch.int8)
    order = torch.argsort(key, dim=1, stable=True)
    index = order[:, :kept] if right_padded else order[:, length - kept :]
    return index, survive.gather(1, index)


def padding_mask_from(attention_mask: object, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The 2-D padding mask ``(B, L)`` behind whatever mask a decoder received at prefill.

    transformers passes ``None`` (no padding), a 2-D ``(B, L)`` mask, or, with a static cache, a 4-D mask
    ``(B, 1, L, S)`` (bool, or float with 0 where attending) or a dict of them keyed by attention type. For the
    4-D forms the last query row tells which of the first ``L`` keys are real tokens.

    Args:
        attention_mask: The mask as the decoder received it.
        batch: ``B``.
        length: ``L``.
        device: Device of the result.

    Returns:
        Bool ``(B, L)``, True for real tokens.

    Raises:
        NotImplementedError: For a mask form this cannot read (e.g. flex attention's ``BlockMask``).
    """
    if attention_mask is None:
        return torch.ones((batch, length), dtype=torch.bool, device=device)
    if isinstance(attention_mask, dict):
        if not attention_mask:
            return torch.ones((batch, length), dtype=torch.bool, device=device)
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values())))
    if not isinstance(attention_mask, torch.Tensor):
        raise UnsupportedError(
            f"tokred.vlm cannot read an attention mask of type {type(attention_mask).__name__}; "
            "use attn_implementation 'eager', 'sdpa' or 'flash_attention_2' with a 2-D attention_mask"
        )
    if attention_mask.dim() == 2:
        return attention_mask[:, -length:].to(device=device).bool()
    if attention_mask.dim() == 4:
        last_row = attention_mask[:, 0, -1, :length]
        if last_row.dtype == torch.bool:
            return last_row.to(device)
        return (last_row == 0).to(device)  # additive float mask: 0 where attending
    raise UnsupportedError(f"tokred.vlm cannot read an attention mask of shape {tuple(attention_mask.shape)}")


def packed_segments(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
    """The sequence of each token of packed (padding-free) rows, as transformers finds them, or None.

    transformers reads several sequences packed into one row off the text positions: a new sequence starts
    wherever the position does not continue by one. The text positions are the positions themselves, or the
    first row of the 4-row M-RoPE layout.

    Args:
        positions: ``(B, L)``, ``(3, B, L)`` or ``(4, B, L)`` original positions.
        valid: Bool ``(B, L)`` non-padding tokens (packed rows have none).

    Returns:
        Long ``(B, L)`` sequence ids counted from 0 in each row, or None when every row holds one sequence
        (or the layout has no text row to read them from).
    """
    if positions.dim() == 2:
        text = positions
    elif positions.shape[0] == 4:
        text = positions[0]
    else:
        return None
    step = torch.diff(text, prepend=text[:, :1] - 1, dim=-1)
    segments = ((step != 1) & valid).long().cumsum(dim=-1)
    return segments if bool((segments[:, -1] > 0).any()) else None


def compact_positions(
    positions: torch.Tensor,
    survive: torch.Tensor,
    valid: torch.Tensor,
    group_ids: torch.Tensor | None,
    *,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions with the gaps left by dropped tokens closed, computed in original coordinates.

    For ordinary (one-row) positions a surviving token gets the row's first valid position plus its rank among
    the survivors, which is what the model would have used had the dropped tokens never existed. For M-RoPE
    (rows ``t, h, w``) there is no canonical answer; tokred moves the bounding box of each visual group's kept
    tokens to the group's start corner (each axis on its own, offsets between kept tokens unchanged), so the
    group spans only what its kept tokens cover, and shifts everything after it down by what was saved. The
    text row of the 4-row layout is numbered like one-row positions. Both rules leave positions unchanged when
    nothing is dropped. Packed rows are compacted one sequence at a time.

    Args:
        positions: ``(B, L)``, ``(3, B, L)`` or ``(4, B, L)`` original positions.
        survive: Bool ``(B, L)`` surviving tokens.
        valid: Bool ``(B, L)`` non-padding tokens.
        group_ids: Long ``(B, L)``, the visual group of each token, ``-1`` for text (needed for M-RoPE only).
        segments: Long ``(B, L)``, the packed sequence of each token
            ([`packed_segments`][tokred.vlm.sequence.packed_segments]), or None for one sequence per row.

    Returns:
        Positions of the same shape and dtype; entries of dropped or padding tokens are unchanged.
    """
    if positions.dim() == 2:
        return _compact_one_row(positions, survive, valid, segments)
    if group_ids is None:
        raise ValueError("compact_positions needs group_ids for M-RoPE positions")
    out = positions.clone()
    rows = positions.shape[0]
    first = 0
    if rows == 4:
        out[0] = _compact_one_row(positions[0], survive, valid, segments)
        first = 1
    out[first:] = _compact_mrope(positions[first:], survive, group_ids, segments)
    return out


def _compact_one_row(
    positions: torch.Tensor, survive: torch.Tensor, valid: torch.Tensor, segments: torch.Tensor | None
) -> torch.Tensor:
    alive = survive.long().cumsum(dim=1)
    if segments is None:
        first_valid = valid.to(torch.int8).argmax(dim=1)
        start = positions.gather(1, first_valid.unsqueeze(1))  # (B, 1)
        rank = alive - 1
    else:
        columns = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        begins = torch.ones_like(survive)
        begins[:, 1:] = segments[:, 1:] != segments[:, :-1]
        first = torch.where(begins, columns, 0).cummax(dim=1).values  # first column of each token's sequence
        start = positions.gather(1, first)
        rank = alive - alive.gather(1, first) + survive.long().gather(1, first) - 1
    return torch.where(survive, start + rank.to(positions.dtype), positions)


def _compact_mrope(
    positions: torch.Tensor, survive: torch.Tensor, group_ids: torch.Tensor, segments: torch.Tensor | None
) -> torch.Tensor:
    out = positions.clone()
    for row in range(positions.shape[1]):
        pos, alive = positions[:, row], survive[row]  # (R, L), (L,)
        ids = group_ids[row]
        sequence = segments[row] if segments is not None else torch.zeros_like(ids)
        # Runs of equal group id within one sequence (text runs included) are handled as one slice each.
        change = (torch.diff(ids, prepend=ids[:1] - 1) != 0) | (torch.diff(sequence, prepend=sequence[:1] - 1) != 0)
        starts = [*torch.nonzero(change).squeeze(1).tolist(), ids.numel()]
        shift, current = 0, None
        for column, end in itertools.pairwise(starts):
            if int(sequence[column]) != current:  # a packed sequence starts: nothing saved before it
                shift, current = 0, int(sequence[column])
            span = pos[:, column:end]  # (R, n)
            if int(ids[column]) < 0:
                out[:, row, column:end] = span - shift
                continue
            kept = span[:, alive[column:end]]
            if kept.shape[1]:
                low, high = span.amin(dim=1), span.amax(dim=1)
                kept_low, kept_high = kept.amin(dim=1), kept.amax(dim=1)
                # Each axis is re-anchored at the group's start corner, keeping offsets between kept tokens.
                out[:, row, column:end] = span - shift - (kept_low - low).unsqueeze(1)
                shift += int((high - low).max()) - int((kept_high - kept_low).max())
    return out


def decode_positions(last_position: torch.Tensor, past_length: int, prefill_length: int, num_new: int) -> torch.Tensor:
    """Positions of the tokens of a decode step, continuing from the reduced prefill.

    ``generate`` keeps positions in original coordinates; after a reduced prefill the next token must instead
    follow the last prefill position, offset by the tokens generated since.

    Args:
        last_position: ``(..., B, 1)`` position of each row's last prefill token, in any row layout.
        past_length: Tokens in the cache before this step (reduced coordinates).
        prefill_length: ``L'``, the reduced prefill length.
        num_new: Tokens in this step.

    Returns:
        ``(..., B, num_new)`` positions.
    """
    steps = torch.arange(num_new, device=last_position.device, dtype=last_position.dtype)
    return last_position + 1 + (past_length - prefill_length) + steps
