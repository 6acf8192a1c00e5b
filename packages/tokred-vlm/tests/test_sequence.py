"""Sequence bookkeeping of a reduced prefill, against hand-written cases."""

from __future__ import annotations

import pytest
import torch

from tokred.vlm.sequence import compact_positions, decode_positions, padding_mask_from, survivor_index


def test_survivor_index_right_aligns_left_padded_rows():
    valid = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    survive = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 1, 1]], dtype=torch.bool)
    index, mask = survivor_index(survive, valid)
    # Row 0 keeps columns 1, 3, 4; row 1 keeps 0, 3, 4; both right-aligned, no padding column left.
    assert index.tolist() == [[1, 3, 4], [0, 3, 4]]
    assert mask.all()


def test_survivor_index_pads_shorter_rows_on_the_left():
    valid = torch.ones(2, 4, dtype=torch.bool)
    survive = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    index, mask = survivor_index(survive, valid)
    assert index.shape == (2, 4)
    assert index[1, 2:].tolist() == [2, 3]
    assert mask.tolist() == [[True] * 4, [False, False, True, True]]


def test_survivor_index_keep_all_is_identity():
    valid = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    index, mask = survivor_index(valid.clone(), valid)
    assert index.tolist() == [[0, 1, 2, 3]] * 2
    assert torch.equal(mask, valid)


def test_survivor_index_keeps_right_padding_on_the_right():
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    survive = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    index, mask = survivor_index(survive, valid)
    assert index.tolist() == [[0, 2, 1], [0, 1, 3]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_padding_mask_from_every_form():
    two_d = torch.tensor([[0, 1, 1]])
    assert padding_mask_from(None, 1, 3, torch.device("cpu")).all()
    assert padding_mask_from(two_d, 1, 3, torch.device("cpu")).tolist() == [[False, True, True]]
    # A static cache's 4-D masks have more key columns than tokens; the last query row tells padding.
    causal = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    four_d = (causal & torch.tensor([0, 1, 1, 1, 1], dtype=torch.bool))[None, None]
    assert padding_mask_from(four_d, 1, 3, torch.device("cpu")).tolist() == [[False, True, True]]
    additive = torch.where(four_d, 0.0, torch.finfo(torch.float32).min)
    assert padding_mask_from(additive, 1, 3, torch.device("cpu")).tolist() == [[False, True, True]]
    assert padding_mask_from({"full_attention": four_d}, 1, 3, torch.device("cpu")).tolist() == [[False, True, True]]
    with pytest.raises(NotImplementedError, match="cannot read an attention mask"):
        padding_mask_from(object(), 1, 3, torch.device("cpu"))


def test_compact_one_row_positions_close_gaps_from_the_first_valid_position():
    positions = torch.tensor([[0, 1, 2, 3, 4, 5]])  # a plain call numbers padding too
    valid = torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    survive = torch.tensor([[0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    groups = torch.tensor([[-1, -1, 0, 0, 0, -1]])
    out = compact_positions(positions, survive, valid, groups)
    assert out[0, [1, 4, 5]].tolist() == [1, 2, 3]


def test_compact_mrope_keeps_relative_offsets_and_shifts_what_follows():
    # text at 0, an image group of 4 tokens on a 2x2 grid starting at 1, text after it at 3.
    t = torch.tensor([0, 1, 1, 1, 1, 3])
    h = torch.tensor([0, 1, 1, 2, 2, 3])
    w = torch.tensor([0, 1, 2, 1, 2, 3])
    positions = torch.stack([t, h, w]).unsqueeze(1)  # (3, 1, 6)
    valid = torch.ones(1, 6, dtype=torch.bool)
    groups = torch.tensor([[-1, 0, 0, 0, 0, -1]])
    # Keep only the bottom-right patch: the group shrinks to one position and the text after it moves up by 1.
    survive = torch.tensor([[1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    out = compact_positions(positions, survive, valid, groups)
    assert out[:, 0, 4].tolist() == [1, 1, 1]  # (1, 2, 2) moved to the group's corner (1, 1, 1)
    assert out[:, 0, 5].tolist() == [2, 2, 2]  # 3 - saved extent 1
    # Keep-all changes nothing; the 4-row layout numbers its text row like one-row positions.
    assert torch.equal(compact_positions(positions, valid, valid, groups), positions)
    four = torch.cat([torch.arange(6).view(1, 1, 6), positions])
    out4 = compact_positions(four, survive, valid, groups)
    assert out4[0, 0, [0, 4, 5]].tolist() == [0, 1, 2]
    assert torch.equal(out4[1:], out)


def test_decode_positions_continue_after_the_reduced_prefill():
    last = torch.tensor([[7], [9]])
    assert decode_positions(last, past_length=10, prefill_length=10, num_new=1).tolist() == [[8], [10]]
    assert decode_positions(last, past_length=12, prefill_length=10, num_new=2).tolist() == [[10, 11], [12, 13]]
    last3 = torch.tensor([[[5]], [[6]], [[7]]])
    assert decode_positions(last3, 4, 4, 1).squeeze().tolist() == [6, 7, 8]
