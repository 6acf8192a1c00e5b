"""Drawing reductions: patch states, colours, tiling and the PNG writer."""

import struct
import zlib

import pytest
import torch

from tokred.core import Reduction, create_reducer
from tokred.core.visualize import cluster_colors, draw_reduction, patch_states, save_png, tile_images


def _plan(assignment, indices, n_keep):
    assignment = torch.tensor([assignment])
    tokens = torch.zeros(1, n_keep, 2)
    weights = (assignment >= 0).float()
    sizes = torch.zeros(1, n_keep).scatter_add(1, assignment.clamp_min(0), weights)
    return Reduction(tokens, torch.tensor([indices]), sizes, assignment, weights)


def test_patch_states_follow_the_plan():
    # 4 tokens: slot 0 at token 0 absorbs token 1; slot 1 at token 3; token 2 dropped
    plan = _plan([0, 0, -1, 1], [0, 3], 2)
    state, slot = patch_states(plan)
    assert state.tolist() == [0, 1, 2, 0]
    assert slot.tolist() == [0, 0, -1, 1]
    # a class token at position 2 is skipped by patch_tokens
    state, slot = patch_states(plan, patch_tokens=[0, 1, 3])
    assert state.tolist() == [0, 1, 0]


def test_drawing_marks_kept_merged_and_dropped_patches():
    image = torch.full((3, 4, 4), 0.5)
    plan = _plan([0, 0, -1, 1], [0, 3], 2)  # a 2 x 2 grid of 2 x 2 pixel patches
    picture = draw_reduction(image, plan, grid=(2, 2), scale=2).float() / 255
    assert picture.shape == (8, 8, 3)
    cluster = cluster_colors(1)[0]
    kept_with_cluster, merged, dropped, kept_alone = picture[:4, :4], picture[:4, 4:], picture[4:, :4], picture[4:, 4:]
    # the merged patch is tinted half-way to its cluster's colour
    assert torch.allclose(merged, (0.5 * 0.5 + 0.5 * cluster).expand_as(merged), atol=1 / 255)
    # the dropped patch is dark and grey
    assert torch.allclose(dropped, torch.full_like(dropped, 0.08 + 0.25 * 0.5), atol=1 / 255)
    # a kept patch that absorbed others is framed in its cluster's colour; one kept alone in white
    assert torch.allclose(kept_with_cluster[0, 0], cluster, atol=1 / 255)
    assert torch.allclose(kept_alone[0, 0], torch.ones(3), atol=1 / 255)
    # with scale 2 the frame is one pixel: patch interiors keep the image
    assert torch.allclose(kept_alone[1:3, 1:3], torch.full((2, 2, 3), 0.5), atol=1 / 255)


def test_drawing_a_real_reduction_keeps_the_kept_patches_pixels():
    torch.manual_seed(0)
    image = torch.rand(3, 32, 32)
    reduction = create_reducer("tome", num_keep=5)(torch.randn(2, 16, 8))
    picture = draw_reduction(image, reduction, grid=(4, 4), row=1, scale=4)
    assert picture.shape == (128, 128, 3) and picture.dtype == torch.uint8
    state, _ = patch_states(reduction, row=1)
    assert (state == 0).sum() == 5
    upscaled = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).repeat_interleave(4, 0).repeat_interleave(4, 1)
    for patch in torch.nonzero(state == 0).flatten().tolist():
        r, c = divmod(patch, 4)
        inner = (slice(r * 32 + 2, r * 32 + 30), slice(c * 32 + 2, c * 32 + 30))
        assert torch.equal(picture[inner], upscaled[inner])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": torch.rand(4, 4, 3)}, "floating"),
        ({"grid": (3, 3)}, "does not divide"),
        ({"grid": (1, 2)}, "pass patch_tokens"),
        ({"patch_tokens": [0, 1, 2, 9]}, "patch_tokens must index"),
        ({"row": 1}, "row 1 is out of range"),
        ({"scale": 0}, "scale"),
    ],
)
def test_bad_drawing_arguments_are_refused(kwargs, match):
    arguments = {"image": torch.rand(3, 4, 4), "reduction": _plan([0, 0, -1, 1], [0, 3], 2), "grid": (2, 2)}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        draw_reduction(**arguments)


def test_tile_images_places_each_picture():
    a = torch.full((2, 3, 3), 10, dtype=torch.uint8)
    b = torch.full((4, 2, 3), 20, dtype=torch.uint8)
    c = torch.full((1, 1, 3), 30, dtype=torch.uint8)
    grid = tile_images([a, b, c], columns=2, padding=1, background=0)
    assert grid.shape == (1 + 2 * (4 + 1), 1 + 2 * (3 + 1), 3)
    assert (grid[1:3, 1:4] == 10).all() and (grid[1:5, 5:7] == 20).all() and grid[6, 1].eq(30).all()
    assert (grid == 0).sum() == grid.numel() - 3 * (6 + 8 + 1)
    with pytest.raises(ValueError, match="uint8"):
        tile_images([a.float()], columns=1)


def _read_png(data: bytes) -> torch.Tensor:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, {}
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        offset += 12 + length
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color_type) == (8, 2)
    raw = torch.tensor(list(zlib.decompress(chunks[b"IDAT"])), dtype=torch.uint8).reshape(height, 1 + 3 * width)
    assert (raw[:, 0] == 0).all()  # filter type "none" on every row
    return raw[:, 1:].reshape(height, width, 3)


def test_save_png_round_trips(tmp_path):
    picture = torch.randint(0, 256, (7, 5, 3), dtype=torch.uint8)
    path = save_png(picture, tmp_path / "sub" / "p.png")
    assert torch.equal(_read_png(path.read_bytes()), picture)
    with pytest.raises(ValueError, match="uint8"):
        save_png(picture.float(), tmp_path / "q.png")


def test_cluster_colours_are_distinct():
    colors = cluster_colors(12)
    assert colors.shape == (12, 3)
    distances = torch.cdist(colors, colors) + torch.eye(12)
    assert distances.min() > 0.05
